"""C++ source of the row sources of the vectorised decode kernel (``cpu_fast_src.py``; AVX-512): ``Src`` reads the row
of one token and KV head of a stored block (described by ``cpu.py``'s meta row) into ``NC`` zmm registers of 16
floats.

- packed codes whose rows are whole 16-byte blocks (2/4/8 bit, ``D * bits % 128 == 0``) with token-axis groups of a
  multiple of 16 channels (or one group) or per-channel statistics (the scale/zero rows of the current token group
  cached per head): 16 bytes are widened to 16 int32 lanes once, each chunk of 16 codes is one lane permutation, a
  variable shift and a mask, then ``code * scale + zero`` one FMA per chunk;
- fp32 / fp16 dense rows: loaded (and widened);
- a channel split whose two parts keep the output's column order: both parts' rows of a tile of ``FT`` tokens
  decoded in one pass each (``part_rows``: one unpack over the tile's contiguous codes, then the scales), each chunk
  of 16 output columns one load (or, where the chunk mixes both parts, two expanding loads);
- sparse outliers over such packed codes: the codes' row in registers, then (only for a row that has outliers,
  found from where the head's previous row ended) the row stored, its outliers written over it, and reloaded;
- anything else (3-bit, bf16, other splits or sparse bases): all heads of a token through the generic ``Dec::row``
  (``cpu_decode_src.py``) into a row buffer.
"""

ROWS_SOURCE = r"""
constexpr int64_t FT = 16;  // tokens per tile
constexpr int64_t PF = 16;  // rows read ahead (software prefetch)

// how one source (K or V) is read: kind 0 packed codes, 1 dense fp32, 2 dense fp16, 3 generic (Dec::row), 4 channel
// split, 5 sparse outliers over packed codes
struct Src {
  const int64_t* m;
  int kind = 3;
  int64_t H = 0, D = 0;
  // packed
  const uint8_t* codes = nullptr;
  const void* sc = nullptr;
  const void* ze = nullptr;
  int64_t sdt = 0, bits = 8, T = 0, group = 0, ng = 1, per = 1, rb = 0;
  bool tok = true;
  __m512i idx[4], shv, mask;
  std::vector<float> cs, cz;   // channel axis: per head the scale / zero row of the cached group
  std::vector<int64_t> ckey;
  // channel split (kind 4): per chunk of 16 output columns, the normal-column mask and the columns before it
  std::vector<uint16_t> cmask;
  std::vector<int64_t> pn, psp;
  std::vector<float> a, b;
  // sparse (kind 5): per head, where the last row's outliers ended and which row it was
  std::vector<int64_t> cur, prev;
  // generic
  Dec dec;
  std::vector<float> buf;
  int64_t brow = -1, bbi = -1, bcnt = 0, tend = 0;  // the rows held (kind 3: one; kind 4: a tile up to tend)

  // packed codes this source can read into registers (``pm``: their meta row)
  bool packed_init(const int64_t* pm) {
    if (!(pm[0] == 1 && (pm[5] == 2 || pm[5] == 4 || pm[5] == 8) && pm[6] == H && pm[8] == D &&
          (D * pm[5]) % 128 == 0 && (pm[9] == 0 || pm[11] == 1 || (pm[10] > 0 && pm[10] % 16 == 0))))
      return false;
    codes = reinterpret_cast<const uint8_t*>(pm[1]);
    sc = reinterpret_cast<const void*>(pm[2]);
    ze = reinterpret_cast<const void*>(pm[3]);
    sdt = pm[4]; bits = pm[5]; T = pm[7]; tok = pm[9] != 0; group = pm[10]; ng = pm[11];
    per = 8 / bits;
    rb = D * bits / 8;
    for (int k = 0; k < per; ++k) {
      alignas(64) int32_t ix[16];
      for (int l = 0; l < 16; ++l) ix[l] = (16 * k + l) / per;
      idx[k] = _mm512_load_si512(ix);
    }
    alignas(64) int32_t sh[16];
    for (int l = 0; l < 16; ++l) sh[l] = (int32_t)(bits * (l % per));
    shv = _mm512_load_si512(sh);
    mask = _mm512_set1_epi32((1 << bits) - 1);
    if (!tok) { cs.resize(H * D); cz.resize(H * D); ckey.assign(H, -1); }
    return true;
  }

  Src(const int64_t* meta, int64_t Hk, int64_t D_) : m(meta), H(Hk), D(D_), dec(meta) {
    if (packed_init(m)) {
      kind = 0;
    } else if (m[0] == 3 && m[5] == H && m[6] == D && m[7] == m[16 + 7] && packed_init(m + 16)) {
      kind = 5;  // sparse outliers over packed codes: the codes' row, then the row's outliers written over it
      cur.assign(H, 0);
      prev.assign(H, -2);
    } else if (m[0] == 0 && m[7] == D && (m[2] == 0 || m[2] == 1)) {
      kind = m[2] == 0 ? 1 : 2;
    } else if (m[0] == 2 && m[3] == D && m[2] == H && split_in_order()) {
      kind = 4;
      a.resize(FT * dec.sub[0].width() + 16);
      b.resize(FT * dec.sub[1].width() + 16);
    } else {
      buf.resize(H * D);
    }
  }

  // rows [t, t + cnt) of one part of a split (``[B, 1, T, n]``) into ``out`` ``[cnt, n]``: packed codes unpacked in
  // one pass over the tile's contiguous codes, then scaled row by row; other parts row by row
  static void part_rows(Dec& d, int64_t bi, int64_t t, int64_t cnt, float* out) {
    const int64_t* pm = d.m;
    const int64_t W = d.width();
    if (pm[0] != 1 || pm[6] != 1) {
      for (int64_t r = 0; r < cnt; ++r) d.row(bi, t + r, out + r * W);
      return;
    }
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(pm[1]);
    const void* sc = reinterpret_cast<const void*>(pm[2]);
    const void* ze = reinterpret_cast<const void*>(pm[3]);
    const int64_t sdt = pm[4], T = pm[7], D = pm[8], group = pm[10], ng = pm[11];
    unpack_row(codes, (int)pm[5], (bi * T + t) * D, cnt * D, out);
    for (int64_t r = 0; r < cnt; ++r) {
      float* o = out + r * D;
      const int64_t row = bi * T + t + r;
      if (pm[9]) {
        for (int64_t g = 0; g < ng; ++g) {
          const float s = loadf(sc, sdt, row * ng + g), z = loadf(ze, sdt, row * ng + g);
          const int64_t d1 = std::min(D, (g + 1) * group);
          for (int64_t e = g * group; e < d1; ++e) o[e] = o[e] * s + z;
        }
        continue;
      }
      const int64_t g = (t + r) / group, key = bi * ng + g;
      if (key != d.last) {
        for (int64_t e = 0; e < D; ++e) {
          d.srow[e] = loadf(sc, sdt, (bi * D + e) * ng + g);
          d.zrow[e] = loadf(ze, sdt, (bi * D + e) * ng + g);
        }
        d.last = key;
      }
      const float* __restrict sr = d.srow.data();
      const float* __restrict zr = d.zrow.data();
      for (int64_t e = 0; e < D; ++e) o[e] = o[e] * sr[e] + zr[e];
    }
  }

  // a split whose normal and special columns each keep the output's order: each chunk is two expanding loads
  bool split_in_order() {
    const int32_t* cm = reinterpret_cast<const int32_t*>(m[1]);
    const int64_t W = H * D;
    int64_t nn = 0, ns = 0;
    for (int64_t i = 0; i < W; ++i) {
      if (i % 16 == 0) { pn.push_back(nn); psp.push_back(ns); cmask.push_back(0); }
      if (cm[i] >= 0) {
        if (cm[i] != nn++) return false;
        cmask.back() |= (uint16_t)(1u << (i % 16));
      } else if (-cm[i] - 1 != ns++) {
        return false;
      }
    }
    return true;
  }

  // the row of packed codes (kinds 0 and 5)
  template <int NC>
  inline void packed_load(int64_t bi, int64_t h, int64_t t, __m512* r) {
    const int64_t bh = bi * H + h, row = bh * T + t;
    const uint8_t* p = codes + row * rb;
    if (t + PF < T) {  // the row PF tokens ahead: one stream per head and tensor, more than the prefetchers follow
      _mm_prefetch(reinterpret_cast<const char*>(p + PF * rb), _MM_HINT_T0);
      if (tok) {
        _mm_prefetch(reinterpret_cast<const char*>(sc) + (row + PF) * ng * (sdt ? 2 : 4), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ze) + (row + PF) * ng * (sdt ? 2 : 4), _MM_HINT_T0);
      }
    }
    for (int blk = 0; blk < NC / per; ++blk) {
      const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * blk)));
      for (int k = 0; k < per; ++k) {
        __m512i x = per == 1 ? w : _mm512_srlv_epi32(_mm512_permutexvar_epi32(idx[k], w), shv);
        r[blk * per + k] = _mm512_cvtepi32_ps(_mm512_and_si512(x, mask));
      }
    }
    if (tok) {
      for (int c = 0; c < NC; ++c) {
        const int64_t g = ng == 1 ? 0 : (16 * c) / group;
        const float s = loadf(sc, sdt, row * ng + g), z = loadf(ze, sdt, row * ng + g);
        r[c] = _mm512_fmadd_ps(r[c], _mm512_set1_ps(s), _mm512_set1_ps(z));
      }
    } else {
      const int64_t g = t / group, key = bi * ng + g;
      float* s = cs.data() + h * D;
      float* z = cz.data() + h * D;
      if (ckey[h] != key) {
        for (int64_t d = 0; d < D; ++d) {
          s[d] = loadf(sc, sdt, (bh * D + d) * ng + g);
          z[d] = loadf(ze, sdt, (bh * D + d) * ng + g);
        }
        ckey[h] = key;
      }
      for (int c = 0; c < NC; ++c)
        r[c] = _mm512_fmadd_ps(r[c], _mm512_loadu_ps(s + 16 * c), _mm512_loadu_ps(z + 16 * c));
    }
  }

  // row of (token t, KV head h) into NC chunks of 16 floats
  template <int NC>
  inline void load(int64_t bi, int64_t h, int64_t t, __m512* r) {
    if (kind == 5) {
      packed_load<NC>(bi, h, t, r);
      const int64_t nnz = m[1], row = (bi * H + h) * T + t;
      const int32_t* ix = reinterpret_cast<const int32_t*>(m[2]);
      int64_t k = prev[h] == row - 1 ? cur[h] : std::lower_bound(ix, ix + nnz, (int64_t)(row * D)) - ix;
      if (k < nnz && ix[k] < (row + 1) * D) {
        alignas(64) float tmp[NC * 16];
        for (int c = 0; c < NC; ++c) _mm512_store_ps(tmp + 16 * c, r[c]);
        const void* vals = reinterpret_cast<const void*>(m[3]);
        for (; k < nnz && ix[k] < (row + 1) * D; ++k) tmp[ix[k] - row * D] = loadf(vals, m[4], k);
        for (int c = 0; c < NC; ++c) r[c] = _mm512_load_ps(tmp + 16 * c);
      }
      cur[h] = k;
      prev[h] = row;
      return;
    }
    if (kind == 0) {
      packed_load<NC>(bi, h, t, r);
      return;
    }
    if (kind == 1 || kind == 2) {
      const int64_t base = bi * m[3] + h * m[4] + t * m[5];
      for (int c = 0; c < NC; ++c) {
        if (kind == 1) {
          r[c] = _mm512_loadu_ps(static_cast<const float*>(reinterpret_cast<const void*>(m[1])) + base + 16 * c);
        } else {
          const at::Half* hp = reinterpret_cast<const at::Half*>(m[1]) + base + 16 * c;
          r[c] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hp)));
        }
      }
      return;
    }
    if (kind == 4) {
      if (bi != bbi || t < brow || t >= brow + bcnt) {  // the next tile of both parts' rows
        bcnt = std::min(FT, std::max<int64_t>(1, tend - t));
        part_rows(dec.sub[0], bi, t, bcnt, a.data());
        part_rows(dec.sub[1], bi, t, bcnt, b.data());
        brow = t;
        bbi = bi;
      }
      const float* ar = a.data() + (t - brow) * dec.sub[0].width();
      const float* br = b.data() + (t - brow) * dec.sub[1].width();
      for (int c = 0; c < NC; ++c) {
        const int64_t k = h * NC + c;
        const __mmask16 mk = cmask[k];  // a chunk that mixes both parts: two plain loads expanded in registers
        // (the memory form of the expanding load is microcoded and slow on this CPU; the buffers have 16 floats of
        // slack past their last row)
        r[c] = mk == 0xFFFF ? _mm512_loadu_ps(ar + pn[k])
                            : _mm512_mask_expand_ps(_mm512_maskz_expand_ps(mk, _mm512_loadu_ps(ar + pn[k])),
                                                    (__mmask16)~mk, _mm512_loadu_ps(br + psp[k]));
      }
      return;
    }
    if (brow != t || bbi != bi) {
      dec.row(bi, t, buf.data());
      brow = t;
      bbi = bi;
    }
    for (int c = 0; c < NC; ++c) r[c] = _mm512_loadu_ps(buf.data() + h * D + 16 * c);
  }
};
"""

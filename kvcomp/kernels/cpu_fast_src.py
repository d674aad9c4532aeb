"""C++ source of the vectorised decode kernel ``decode_partial`` (AVX-512; appended after ``cpu_decode_src.py``,
whose ``Dec`` / ``exp_neg`` / ``TB`` it uses): the same step as ``decode_partial_generic``, restructured by the
profile of the generic loop (per-token row decode through a switch, G dot products each reduced lane by lane).

Per thread, tiles of ``FT`` = 16 tokens; per token and KV head the key row is held in ``NC`` = D/16 zmm registers:

- a *fast source* decodes it straight into registers: bit-packed codes whose rows are whole 16-byte blocks
  (2/4/8 bit, ``D * bits % 128 == 0``), token-axis groups of a multiple of 16 channels (or one group) or
  per-channel statistics (the scale/zero rows of the current token group cached per head), fp32 / fp16 dense
  rows: 16 bytes are widened to 16 int32 lanes once, each chunk of 16 codes is one lane permutation, a
  variable shift and a mask, then ``code * scale + zero`` is one FMA per chunk;
- any other source (channel split, sparse outliers, 3-bit, bf16) decodes all heads of a token through the
  generic ``Dec::row`` into a row buffer, read from there;

then RoPE in registers (the two halves of the row are chunks ``c`` and ``c + NC/2``), the ``G`` query heads'
scores (NC FMAs and one reduction each), the tile's online softmax, and ``acc += p * v`` with the value row
decoded the same way. Without AVX-512, or where ``D % 32 != 0`` or ``D > 128``, ``decode_partial`` is the
generic kernel. Both are held to the materialize oracle (``tests/test_cpu_kernels.py``).
"""

FAST_SOURCE = r"""
#if defined(__AVX512F__)
#include <immintrin.h>
namespace {

constexpr int64_t FT = 16;  // tokens per tile

// how one source (K or V) is read: kind 0 packed codes, 1 dense fp32, 2 dense fp16, 3 generic (Dec::row)
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
  // generic
  Dec dec;
  std::vector<float> buf;
  int64_t brow = -1, bbi = -1;

  Src(const int64_t* meta, int64_t Hk, int64_t D_) : m(meta), H(Hk), D(D_), dec(meta) {
    if (m[0] == 1 && (m[5] == 2 || m[5] == 4 || m[5] == 8) && m[8] == D && (D * m[5]) % 128 == 0 &&
        (m[9] == 0 || m[11] == 1 || (m[10] > 0 && m[10] % 16 == 0))) {
      kind = 0;
      codes = reinterpret_cast<const uint8_t*>(m[1]);
      sc = reinterpret_cast<const void*>(m[2]);
      ze = reinterpret_cast<const void*>(m[3]);
      sdt = m[4]; bits = m[5]; T = m[7]; tok = m[9] != 0; group = m[10]; ng = m[11];
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
    } else if (m[0] == 0 && m[7] == D && (m[2] == 0 || m[2] == 1)) {
      kind = m[2] == 0 ? 1 : 2;
    } else if (m[0] == 2 && m[3] == D && m[2] == H && split_in_order()) {
      kind = 4;
      a.resize(dec.sub[0].width() + 16);
      b.resize(dec.sub[1].width() + 16);
    } else {
      buf.resize(H * D);
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

  // row of (token t, KV head h) into NC chunks of 16 floats
  template <int NC>
  inline void load(int64_t bi, int64_t h, int64_t t, __m512* r) {
    if (kind == 0) {
      const int64_t bh = bi * H + h, row = bh * T + t;
      const uint8_t* p = codes + row * rb;
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
      if (brow != t || bbi != bi) {
        dec.sub[0].row(bi, t, a.data());
        dec.sub[1].row(bi, t, b.data());
        brow = t;
        bbi = bi;
      }
      for (int c = 0; c < NC; ++c) {
        const int64_t k = h * NC + c;
        const __mmask16 mk = cmask[k];
        r[c] = _mm512_mask_expandloadu_ps(_mm512_maskz_expandloadu_ps(mk, a.data() + pn[k]), (__mmask16)~mk,
                                          b.data() + psp[k]);
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

template <int NC>
void decode_fast(const float* qp, const int64_t* kmeta, const int64_t* vmeta, int64_t B, int64_t Hk, int64_t G,
                 int64_t t0, int64_t n, const int32_t* ps_, const float* cs, const float* sn, int64_t RD,
                 float* M, float* L, float* A) {
  constexpr int64_t D = NC * 16, NH = NC / 2;
  const int64_t HG = Hk * G;
  const int64_t off = RD == D / 2 ? 0 : D / 2;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 256));
  const int64_t per = (n + nch - 1) / nch;
  const int64_t S = HG * (D + 2);
  std::vector<float> part(B * nch * S);
  at::parallel_for(0, B * nch, 1, [&](int64_t begin, int64_t end) {
    Src kd(kmeta, Hk, D), vd(vmeta, Hk, D);
    std::vector<float> sv(HG * FT);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / nch, c0 = task % nch;
      const int64_t a0 = c0 * per, a1 = std::min(n, a0 + per);
      float* mm = part.data() + task * S;
      float* ll = mm + HG;
      float* ac = ll + HG;
      for (int64_t i = 0; i < HG; ++i) { mm[i] = -INFINITY; ll[i] = 0.f; }
      std::fill(ac, ac + HG * D, 0.f);
      const float* qb = qp + bi * HG * D;
      float* sc = sv.data();
      for (int64_t j0 = a0; j0 < a1; j0 += FT) {
        const int64_t nb = std::min(FT, a1 - j0);
        for (int64_t jj = 0; jj < nb; ++jj) {
          const int64_t t = t0 + j0 + jj;
          const int64_t r = ps_ ? (int64_t)ps_[t] : j0 + jj;
          for (int64_t h = 0; h < Hk; ++h) {
            __m512 k[NC];
            kd.template load<NC>(bi, h, t, k);
            if (cs) {
              const float* c = cs + r * RD;
              const float* si = sn + r * RD;
              for (int cc = 0; cc < NH; ++cc) {
                const __m512 lo = k[cc], hi = k[cc + NH];
                k[cc] = _mm512_fnmadd_ps(hi, _mm512_loadu_ps(si + 16 * cc),
                                         _mm512_mul_ps(lo, _mm512_loadu_ps(c + 16 * cc)));
                k[cc + NH] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(si + off + 16 * cc),
                                             _mm512_mul_ps(hi, _mm512_loadu_ps(c + off + 16 * cc)));
              }
            }
            for (int64_t g = 0; g < G; ++g) {
              const float* qq = qb + (h * G + g) * D;
              __m512 a = _mm512_mul_ps(k[0], _mm512_loadu_ps(qq));
              for (int cc = 1; cc < NC; ++cc) a = _mm512_fmadd_ps(k[cc], _mm512_loadu_ps(qq + 16 * cc), a);
              sc[(h * G + g) * FT + jj] = _mm512_reduce_add_ps(a);
            }
          }
        }
        for (int64_t i = 0; i < HG; ++i) {
          float* si = sc + i * FT;
          float bm = mm[i];
          for (int64_t jj = 0; jj < nb; ++jj) bm = std::max(bm, si[jj]);
          if (bm > mm[i]) {
            const float f = mm[i] == -INFINITY ? 0.f : std::exp(mm[i] - bm);
            ll[i] *= f;
            float* a = ac + i * D;
            for (int64_t d = 0; d < D; ++d) a[d] *= f;
            mm[i] = bm;
          }
          const float mx = mm[i];
#pragma omp simd
          for (int64_t jj = 0; jj < FT; ++jj) si[jj] = exp_neg(si[jj] - mx);
          float sum = 0.f;
          for (int64_t jj = 0; jj < nb; ++jj) sum += si[jj];
          ll[i] += sum;
        }
        for (int64_t jj = 0; jj < nb; ++jj) {
          const int64_t t = t0 + j0 + jj;
          for (int64_t h = 0; h < Hk; ++h) {
            __m512 v[NC];
            vd.template load<NC>(bi, h, t, v);
            for (int64_t g = 0; g < G; ++g) {
              const int64_t i = h * G + g;
              const __m512 p = _mm512_set1_ps(sc[i * FT + jj]);
              float* a = ac + i * D;
              for (int cc = 0; cc < NC; ++cc)
                _mm512_storeu_ps(a + 16 * cc, _mm512_fmadd_ps(p, v[cc], _mm512_loadu_ps(a + 16 * cc)));
            }
          }
        }
      }
    }
  });
  merge_parts(part.data(), B, nch, HG, D, M, L, A);
}

}  // namespace
#endif

void decode_partial(torch::Tensor q, torch::Tensor kmeta, torch::Tensor vmeta, int64_t t0, int64_t t1,
                    torch::Tensor pos, torch::Tensor cos, torch::Tensor sin, torch::Tensor m, torch::Tensor l,
                    torch::Tensor acc) {
#if defined(__AVX512F__)
  const int64_t B = q.size(0), Hk = q.size(1), G = q.size(2), D = q.size(3), n = t1 - t0;
  if (n <= 0) return;
  if (D == 32 || D == 64 || D == 128) {
    const float* cs = opt(cos);
    const int32_t* ps_ = pos.numel() ? pos.data_ptr<int32_t>() : nullptr;
    const int64_t RD = cos.numel() ? cos.size(1) : D;
    auto run = [&](auto nc) {
      decode_fast<decltype(nc)::value>(q.data_ptr<float>(), kmeta.data_ptr<int64_t>(), vmeta.data_ptr<int64_t>(),
                                       B, Hk, G, t0, n, ps_, cs, opt(sin), RD, m.data_ptr<float>(),
                                       l.data_ptr<float>(), acc.data_ptr<float>());
    };
    if (D == 32) run(std::integral_constant<int, 2>());
    else if (D == 64) run(std::integral_constant<int, 4>());
    else run(std::integral_constant<int, 8>());
    return;
  }
#endif
  decode_partial_generic(q, kmeta, vmeta, t0, t1, pos, cos, sin, m, l, acc);
}
"""

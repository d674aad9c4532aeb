"""C++ source of the generic compiled decode kernel ``decode_partial_generic`` (appended to ``cpu_src.SOURCE``,
whose helpers ``unpack_row`` / ``opt`` it uses): one decode step's attention over one block pair
straight from its codes.

Each source (K or V) is described by an int64 meta row (``cpu.py``: ``dense_meta``, ``packed_meta``, ``split_meta``);
a thread decodes the rows of all KV heads of one token (``Dec::row``), rotates the keys with the tile's cos/sin
row, scores the ``G`` query heads of each KV head (query pre-scaled), and keeps per query head a running
(max, sum, accumulator) updated once per ``TB`` tokens; the threads' partial states (the block's tokens split in
``n_threads`` ranges, flash-decoding) are merged into ``m``/``l``/``acc`` in place. RoPE rows come straight
from the rope's cos/sin table ``[P, D]`` at the tokens' int32 positions (``pos``; empty: row ``j`` of ``cos``), or
from its first half ``[P, D/2]`` when both halves are equal (half the table's bytes read per token).
"""

DECODE_SOURCE = r"""
namespace {

inline float loadf(const void* p, int64_t dt, int64_t i) {
  if (dt == 0) return static_cast<const float*>(p)[i];
  if (dt == 1) return static_cast<float>(static_cast<const at::Half*>(p)[i]);
  return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
}

// one source of rows (all heads of one token): meta row of 16 int64 (+16 +16 for a split's two parts, +16 for
// a sparse block's base)
struct Dec {
  const int64_t* m;
  std::vector<Dec> sub;
  std::vector<float> srow, zrow, a, b;
  std::vector<int64_t> cur, prev;  // sparse: per head, where the last row read ended and which row it was
  int64_t last = -1;
  explicit Dec(const int64_t* meta) : m(meta) {
    if (m[0] == 2) {
      sub.emplace_back(meta + 16);
      sub.emplace_back(meta + 32);
      a.resize(sub[0].width());
      b.resize(sub[1].width());
    } else if (m[0] == 3) {
      sub.emplace_back(meta + 16);
      cur.assign(m[5], 0);
      prev.assign(m[5], -2);
    } else if (m[0] == 1) {
      srow.resize(m[6] * m[8]);
      zrow.resize(m[6] * m[8]);
    }
  }
  int64_t width() const {
    switch (m[0]) {
      case 0: return m[6] * m[7];
      case 1: return m[6] * m[8];
      case 2: return m[2] * m[3];
      default: return m[5] * m[6];
    }
  }
  void row(int64_t bi, int64_t t, float* out) {
    if (m[0] == 3) {  // sparse: outlier count, sorted int32 flat index, values, their dtype, H, D, T; base at +16
      sub[0].row(bi, t, out);
      const int64_t nnz = m[1];
      const int32_t* ix = reinterpret_cast<const int32_t*>(m[2]);
      const void* vals = reinterpret_cast<const void*>(m[3]);
      const int64_t H = m[5], D = m[6], T = m[7];
      for (int64_t h = 0; h < H; ++h) {
        const int64_t r = (bi * H + h) * T + t;
        // the row's first outlier: where the previous row of this head ended (rows are read in order), else a
        // binary search; no row pointers are held or built
        int64_t k = prev[h] == r - 1 ? cur[h] : std::lower_bound(ix, ix + nnz, (int64_t)(r * D)) - ix;
        for (; k < nnz && ix[k] < (r + 1) * D; ++k) out[h * D + (ix[k] - r * D)] = loadf(vals, m[4], k);
        cur[h] = k;
        prev[h] = r;
      }
      return;
    }
    if (m[0] == 0) {  // dense: ptr, dtype, stride b, h, t, H, D
      const void* p = reinterpret_cast<const void*>(m[1]);
      const int64_t H = m[6], D = m[7];
      for (int64_t h = 0; h < H; ++h) {
        const int64_t base = bi * m[3] + h * m[4] + t * m[5];
        if (m[2] == 0) {
          const float* r = static_cast<const float*>(p) + base;
          for (int64_t d = 0; d < D; ++d) out[h * D + d] = r[d];
        } else {
          for (int64_t d = 0; d < D; ++d) out[h * D + d] = loadf(p, m[2], base + d);
        }
      }
      return;
    }
    if (m[0] == 1) {  // packed: codes, scale, zero, stat dtype, bits, H, T, D, tok, group, ng
      const uint8_t* codes = reinterpret_cast<const uint8_t*>(m[1]);
      const void* sc = reinterpret_cast<const void*>(m[2]);
      const void* ze = reinterpret_cast<const void*>(m[3]);
      const int64_t sdt = m[4], bits = m[5], H = m[6], T = m[7], D = m[8], tok = m[9], group = m[10], ng = m[11];
      for (int64_t h = 0; h < H; ++h) {
        const int64_t bh = bi * H + h;
        float* o = out + h * D;
        unpack_row(codes, (int)bits, (bh * T + t) * D, D, o);
        if (tok) {
          for (int64_t g = 0; g < ng; ++g) {
            const float s = loadf(sc, sdt, (bh * T + t) * ng + g), z = loadf(ze, sdt, (bh * T + t) * ng + g);
            const int64_t d1 = std::min(D, (g + 1) * group);
            for (int64_t d = g * group; d < d1; ++d) o[d] = o[d] * s + z;
          }
        }
      }
      if (!tok) {
        const int64_t g = t / group, key = bi * ng + g;
        if (key != last) {
          for (int64_t h = 0; h < H; ++h)
            for (int64_t d = 0; d < D; ++d) {
              srow[h * D + d] = loadf(sc, sdt, ((bi * H + h) * D + d) * ng + g);
              zrow[h * D + d] = loadf(ze, sdt, ((bi * H + h) * D + d) * ng + g);
            }
          last = key;
        }
        const int64_t n = H * D;
        for (int64_t i = 0; i < n; ++i) out[i] = out[i] * srow[i] + zrow[i];
      }
      return;
    }
    // split: colmap, H, D, runs (part, first column, first part column, length) and their count; parts at +16
    // (normal), +32 (special)
    sub[0].row(bi, t, a.data());
    sub[1].row(bi, t, b.data());
    const int32_t* rn = reinterpret_cast<const int32_t*>(m[4]);
    for (int64_t r = 0; r < m[5]; ++r, rn += 4)
      std::memcpy(out + rn[1], (rn[0] ? b.data() : a.data()) + rn[2], sizeof(float) * rn[3]);
  }
};

constexpr int64_t TB = 32;  // tokens per softmax block

// exp(x) for x <= 0 (softmax weights): 2^(x log2 e) split into 2^i (exponent bits) and a degree-6 minimax
// polynomial of 2^f on [0, 1), ~2e-7 relative; below -87 it returns ~1e-38 instead of 0 (weights that small
// only ever multiply sums they do not change). Written so that a loop over it vectorizes.
#pragma omp declare simd
inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = ((int32_t)fi + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// online softmax: head i's running max rises to bm (when it is higher); its sum and accumulator [D] are rescaled
inline void raise_max(float* mm, float* ll, float* ac, int64_t i, int64_t D, float bm) {
  if (bm <= mm[i]) return;
  const float f = mm[i] == -INFINITY ? 0.f : std::exp(mm[i] - bm);
  ll[i] *= f;
  float* a = ac + i * D;
  for (int64_t d = 0; d < D; ++d) a[d] *= f;
  mm[i] = bm;
}

// flash-decoding split shared by both decode kernels: each batch row's n tokens in ``nch`` ranges (one per thread,
// at least 256 tokens each); a task = (batch row, range) keeps its own partial state per query head (max, sum,
// accumulator of D), merged into the running state at the end
struct Parts {
  int64_t B, n, HG, D, nch, per, S;
  std::vector<float> part;
  Parts(int64_t B_, int64_t n_, int64_t HG_, int64_t D_) : B(B_), n(n_), HG(HG_), D(D_) {
    const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
    nch = std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 256));
    per = (n + nch - 1) / nch;
    S = HG * (D + 2);
    part.resize(B * nch * S);
  }
  int64_t tasks() const { return B * nch; }
  // the task's batch row and token range [a0, a1), and its state reset (max -inf, sum 0, accumulator 0)
  float* start(int64_t task, int64_t& bi, int64_t& a0, int64_t& a1) {
    bi = task / nch;
    a0 = (task % nch) * per;
    a1 = std::min(n, a0 + per);
    float* mm = part.data() + task * S;
    for (int64_t i = 0; i < HG; ++i) { mm[i] = -INFINITY; mm[HG + i] = 0.f; }
    std::fill(mm + 2 * HG, mm + S, 0.f);
    return mm;
  }
  // every task's state merged into the running state M [B*HG], L [B*HG], A [B*HG, D] in place
  void merge(float* M, float* L, float* A) const {
    for (int64_t task = 0; task < B * nch; ++task) {
      const int64_t bi = task / nch;
      const float* mm = part.data() + task * S;
      const float* ll = mm + HG;
      const float* ac = ll + HG;
      for (int64_t i = 0; i < HG; ++i) {
        const int64_t o = bi * HG + i;
        if (ll[i] == 0.f) continue;
        const float nm = std::max(M[o], mm[i]);
        const float fa = std::exp(M[o] - nm), fb = std::exp(mm[i] - nm);
        L[o] = L[o] * fa + ll[i] * fb;
        float* a = A + o * D;
        for (int64_t d = 0; d < D; ++d) a[d] = a[d] * fa + ac[i * D + d] * fb;
        M[o] = nm;
      }
    }
  }
};

}  // namespace

void decode_partial_generic(torch::Tensor q, torch::Tensor kmeta, torch::Tensor vmeta, int64_t t0, int64_t t1,
                    torch::Tensor pos, torch::Tensor cos, torch::Tensor sin, torch::Tensor m, torch::Tensor l,
                    torch::Tensor acc) {
  const int64_t B = q.size(0), Hk = q.size(1), G = q.size(2), D = q.size(3), n = t1 - t0;
  if (n <= 0) return;
  const int64_t HG = Hk * G;
  const float* qp = q.data_ptr<float>();
  const float* cs = opt(cos);
  const float* sn = opt(sin);
  const int32_t* ps_ = pos.numel() ? pos.data_ptr<int32_t>() : nullptr;  // table row of token j (null: row j)
  const int64_t RD = cos.numel() ? cos.size(1) : D;
  const int64_t off = RD == D / 2 ? 0 : D / 2;  // a half table (both halves equal): one row serves both halves
  Parts parts(B, n, HG, D);
  at::parallel_for(0, parts.tasks(), 1, [&](int64_t begin, int64_t end) {
    Dec kd(kmeta.data_ptr<int64_t>()), vd(vmeta.data_ptr<int64_t>());
    std::vector<float> krow(Hk * D), kr(D), vrow(Hk * D), s(TB * HG);
    for (int64_t task = begin; task < end; ++task) {
      int64_t bi, a0, a1;
      float* mm = parts.start(task, bi, a0, a1);
      float* ll = mm + HG;
      float* ac = ll + HG;
      const float* qb = qp + bi * HG * D;
      for (int64_t j0 = a0; j0 < a1; j0 += TB) {
        const int64_t nb = std::min(TB, a1 - j0);
        for (int64_t jj = 0; jj < nb; ++jj) {
          const int64_t j = j0 + jj;
          kd.row(bi, t0 + j, krow.data());
          for (int64_t h = 0; h < Hk; ++h) {
            const float* k = krow.data() + h * D;
            if (cs) {
              const int64_t r = ps_ ? (int64_t)ps_[t0 + j] : j;
              const float* __restrict c = cs + r * RD;
              const float* __restrict si = sn + r * RD;
              const float* __restrict kk = k;
              float* __restrict out = kr.data();
              const int64_t hd = D / 2;
#pragma omp simd
              for (int64_t d = 0; d < hd; ++d) {
                out[d] = kk[d] * c[d] - kk[d + hd] * si[d];
                out[d + hd] = kk[d + hd] * c[d + off] + kk[d] * si[d + off];
              }
              k = kr.data();
            }
            for (int64_t g = 0; g < G; ++g) {
              const float* qq = qb + (h * G + g) * D;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < D; ++d) dot += qq[d] * k[d];
              s[jj * HG + h * G + g] = dot;
            }
          }
        }
        for (int64_t i = 0; i < HG; ++i) {
          float bm = mm[i];
          for (int64_t jj = 0; jj < nb; ++jj) bm = std::max(bm, s[jj * HG + i]);
          raise_max(mm, ll, ac, i, D, bm);
        }
        float* __restrict ps = s.data();
        const float* __restrict mx = mm;
        for (int64_t jj = 0; jj < nb; ++jj) {
#pragma omp simd
          for (int64_t i = 0; i < HG; ++i) ps[jj * HG + i] = exp_neg(ps[jj * HG + i] - mx[i]);
        }
        for (int64_t jj = 0; jj < nb; ++jj) {
          vd.row(bi, t0 + j0 + jj, vrow.data());
          for (int64_t h = 0; h < Hk; ++h) {
            const float* __restrict v = vrow.data() + h * D;
            for (int64_t g = 0; g < G; ++g) {
              const int64_t i = h * G + g;
              const float p = ps[jj * HG + i];
              ll[i] += p;
              float* __restrict a = ac + i * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
            }
          }
        }
      }
    }
  });
  parts.merge(m.data_ptr<float>(), l.data_ptr<float>(), acc.data_ptr<float>());
}
"""

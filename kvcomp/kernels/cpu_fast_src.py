"""C++ source of the vectorised decode kernel ``decode_partial`` (AVX-512; appended after ``cpu_decode_src.py``,
whose ``Dec`` / ``exp_neg`` / ``TB`` it uses): the same step as ``decode_partial_generic``, restructured by the
profile of the generic loop (per-token row decode through a switch, G dot products each reduced lane by lane).

Per thread, tiles of ``FT`` = 16 tokens; per token and KV head the key row is read into ``NC`` = D/16 zmm registers
by its source (``Src``, ``cpu_rows_src.py``: packed codes and dense rows straight into registers, channel splits a
tile at a time, anything else through the generic ``Dec::row``), rotated by RoPE in registers (the two halves of
the row are chunks ``c`` and ``c + NC/2``), scored against the ``G`` query heads (NC FMAs each; the tile's 16
products per head reduced at once by ``sum16``); then the tile's online softmax (exp vectorised over the tile), and
``acc += p * v`` (accumulators in registers over the tile) with the value row read the
same way. Without AVX-512, or for head dims other than 32 / 64 / 128, ``decode_partial`` is the generic kernel.
Both are held to the materialize oracle (``tests/test_cpu_kernels.py``).
"""

from kvcomp.kernels.cpu_rows_src import ROWS_SOURCE

FAST_SOURCE = r"""
#if defined(__AVX512F__)
#include <immintrin.h>
namespace {
""" + ROWS_SOURCE + r"""


// the 16 sums of 16 vectors (``v[j]`` at ``p + 16 * j``): one transpose-and-add tree (45 shuffles and adds for the
// 16, instead of 16 separate horizontal reductions); lane j of the result = the sum of ``v[j]``
inline __m512 sum16(const float* p) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k) {
    const __m512 a = _mm512_loadu_ps(p + 32 * k), b = _mm512_loadu_ps(p + 32 * k + 16);
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per 128-bit lane: a, b, a, b
  }
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(t[2 * k]), b = _mm512_castps_pd(t[2 * k + 1]);
    u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }  // u[k], 128-bit lane l: the lane-l sums of v[4k .. 4k + 3]
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// floats of one thread's scratch for ``fold_range``: the tile's scores [HG, FT], the unreduced score vectors
// [HG, FT, 16] and the tile's value rows [Hk, FT, D]
inline int64_t fold_scratch(int64_t Hk, int64_t G, int64_t D) { return Hk * G * FT * 17 + Hk * FT * D; }

// tokens [a0, a1) of one block pair (sources kd / vd, batch row bi, ``n`` tokens, positions ``ps_`` or row j, no
// rotation where ``cs`` is null) folded into one task's running state (mm / ll / ac of its HG query heads); ``sc``:
// ``fold_scratch`` floats, zeroed once. Per tile of FT tokens: keys decoded and rotated in registers, each query
// head's products kept as vectors and reduced 16 tokens at a time (``sum16``); the value rows decoded once into the
// scratch, then each query head's accumulator held in registers over the tile's tokens.
template <int NC>
void fold_range(Src& kd, Src& vd, int64_t bi, const float* qb, int64_t Hk, int64_t G, int64_t t0, int64_t a0,
                int64_t a1, int64_t n, const int32_t* ps_, const float* cs, const float* sn, int64_t RD, float* sc,
                float* mm, float* ll, float* ac) {
  constexpr int64_t D = NC * 16, NH = NC / 2;
  const int64_t HG = Hk * G;
  const int64_t off = RD == D / 2 ? 0 : D / 2;
  float* pv = sc + HG * FT;       // [HG, FT, 16]
  float* vr = pv + HG * FT * 16;  // [Hk, FT, D]
  kd.tend = vd.tend = t0 + a1;
  for (int64_t j0 = a0; j0 < a1; j0 += FT) {
    const int64_t nb = std::min(FT, a1 - j0);
    for (int64_t jj = 0; jj < nb; ++jj) {
      const int64_t t = t0 + j0 + jj;
      const int64_t r = ps_ ? (int64_t)ps_[t] : j0 + jj;
      if (cs && j0 + jj + PF < n) {  // the rope rows PF tokens ahead
        const int64_t ra = ps_ ? (int64_t)ps_[t + PF] : j0 + jj + PF;
        _mm_prefetch(reinterpret_cast<const char*>(cs + ra * RD), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(sn + ra * RD), _MM_HINT_T0);
      }
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
          _mm512_storeu_ps(pv + ((h * G + g) * FT + jj) * 16, a);
        }
      }
    }
    for (int64_t i = 0; i < HG; ++i) {
      float* si = sc + i * FT;
      _mm512_storeu_ps(si, sum16(pv + i * FT * 16));  // lanes past nb: stale sums, never read below
      float bm = mm[i];
      for (int64_t jj = 0; jj < nb; ++jj) bm = std::max(bm, si[jj]);
      raise_max(mm, ll, ac, i, D, bm);
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
        float* o = vr + (h * FT + jj) * D;
        for (int cc = 0; cc < NC; ++cc) _mm512_storeu_ps(o + 16 * cc, v[cc]);
      }
    }
    for (int64_t i = 0; i < HG; ++i) {
      const float* vh = vr + (i / G) * FT * D;
      const float* pi = sc + i * FT;
      float* a = ac + i * D;
      __m512 acc[NC];
      for (int cc = 0; cc < NC; ++cc) acc[cc] = _mm512_loadu_ps(a + 16 * cc);
      for (int64_t jj = 0; jj < nb; ++jj) {
        const __m512 p = _mm512_set1_ps(pi[jj]);
        for (int cc = 0; cc < NC; ++cc) acc[cc] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vh + jj * D + 16 * cc), acc[cc]);
      }
      for (int cc = 0; cc < NC; ++cc) _mm512_storeu_ps(a + 16 * cc, acc[cc]);
    }
  }
}

template <int NC>
void decode_fast(const float* qp, const int64_t* kmeta, const int64_t* vmeta, int64_t B, int64_t Hk, int64_t G,
                 int64_t t0, int64_t n, const int32_t* ps_, const float* cs, const float* sn, int64_t RD,
                 float* M, float* L, float* A) {
  constexpr int64_t D = NC * 16;
  const int64_t HG = Hk * G;
  Parts parts(B, n, HG, D);
  at::parallel_for(0, parts.tasks(), 1, [&](int64_t begin, int64_t end) {
    Src kd(kmeta, Hk, D), vd(vmeta, Hk, D);
    std::vector<float> sv(fold_scratch(Hk, G, D));
    for (int64_t task = begin; task < end; ++task) {
      int64_t bi, a0, a1;
      float* mm = parts.start(task, bi, a0, a1);
      fold_range<NC>(kd, vd, bi, qp + bi * HG * D, Hk, G, t0, a0, a1, n, ps_, cs, sn, RD, sv.data(), mm, mm + HG,
                     mm + 2 * HG);
    }
  });
  parts.merge(M, L, A);
}

}  // namespace
#endif

void decode_partial(torch::Tensor q, torch::Tensor kmeta, torch::Tensor vmeta, int64_t t0, int64_t t1,
                    torch::Tensor pos, torch::Tensor cos, torch::Tensor sin, torch::Tensor m, torch::Tensor l,
                    torch::Tensor acc) {
  if (pos.numel() && cos.numel()) {  // every stored position must have its row in the table (a caller-given bound)
    const int32_t* pp = pos.data_ptr<int32_t>();
    int32_t top = 0;
    for (int64_t j = t0; j < t1; ++j) top = std::max(top, pp[j]);
    TORCH_CHECK(top < cos.size(0), "decode_partial: position ", top, " outside the rope table of ", cos.size(0));
  }
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

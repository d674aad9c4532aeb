"""C++ source of the compiled CPU kernels (``cpu.py`` builds it once with ``torch.utils.cpp_extension``).

Every kernel writes float32 rows ``out[b, h, j, :]`` (``out`` ``[B, H, n, D]``, any strides, last dim
contiguous) for tokens ``t0 + j`` of a stored block, optionally rotated by split-half RoPE
``x*cos + rotate_half(x)*sin`` with ``cos``/``sin`` ``[n, D]`` float32 (empty = no rotation), all in one pass:

- ``packed_tile``: bit-packed codes (2/3/4/8 bit, ``kvcomp.cache.quant.Packed``; addressing of ``tiles.py``)
  with fp16/fp32 scale and zero per token group or per channel group, ``x = code * scale + zero``;
- ``dense_tile``: a full-precision / fp16 block;
- ``split_tile``: a ``ChannelSplit`` tile from its two dequantized parts ``[B, n, N_normal]`` /
  ``[B, n, N_special]`` and an int32 column map ``[H*D]`` (``c >= 0``: normal column ``c``; ``c < 0``: special
  column ``-c - 1``);
- ``rope_tile``: the rotation alone, in place;
- ``decode_partial``: one decode step's attention straight from a block pair's codes (``decode.py``): each
  thread decodes rows of its share of the tokens (dense / packed / channel-split sources described by
  ``cpu.py``'s int64 meta rows), applies RoPE in registers, and keeps an online softmax per query head;
  the threads' partial (max, sum, accumulator) are merged into the running state in place.
"""

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// rows (of D elements) per thread at least: smaller tiles run on the calling thread (a parallel region costs
// more than it saves there, and far more on a loaded machine)
constexpr int64_t GRAIN = 4096;

template <typename S>
inline float tof(S x) { return static_cast<float>(x); }

inline void unpack_row(const uint8_t* codes, int bits, int64_t e0, int64_t D, float* row) {
  if (bits == 8) {
    const uint8_t* c = codes + e0;
    for (int64_t d = 0; d < D; ++d) row[d] = (float)c[d];
    return;
  }
  if (bits == 3) {
    for (int64_t d = 0; d < D; ++d) {
      int64_t e = e0 + d, w = (e / 8) * 3;
      uint32_t word = codes[w] | ((uint32_t)codes[w + 1] << 8) | ((uint32_t)codes[w + 2] << 16);
      row[d] = (float)((word >> ((e % 8) * 3)) & 7u);
    }
    return;
  }
  const int per = 8 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  if (e0 % per == 0 && D % per == 0) {
    const uint8_t* c = codes + e0 / per;
    if (bits == 4) {
      for (int64_t k = 0; k < D / 2; ++k) {
        uint8_t byte = c[k];
        row[2 * k] = (float)(byte & 15u);
        row[2 * k + 1] = (float)(byte >> 4);
      }
    } else {
      for (int64_t k = 0; k < D / 4; ++k) {
        uint8_t byte = c[k];
        row[4 * k] = (float)(byte & 3u);
        row[4 * k + 1] = (float)((byte >> 2) & 3u);
        row[4 * k + 2] = (float)((byte >> 4) & 3u);
        row[4 * k + 3] = (float)(byte >> 6);
      }
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    int64_t e = e0 + d;
    row[d] = (float)((codes[e / per] >> ((e % per) * bits)) & mask);
  }
}

inline void write_row(const float* row, int64_t D, float* o, const float* cs, const float* sn) {
  if (cs == nullptr) {
    for (int64_t d = 0; d < D; ++d) o[d] = row[d];
    return;
  }
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) {
    o[d] = row[d] * cs[d] - row[d + h] * sn[d];
    o[d + h] = row[d + h] * cs[d + h] + row[d] * sn[d + h];
  }
}

template <typename S>
void packed_impl(const uint8_t* codes, const S* sc, const S* ze, int bits, int64_t B, int64_t H, int64_t T,
                 int64_t D, bool tok, int64_t group, int64_t ng, int64_t t0, int64_t n, float* out, int64_t ob,
                 int64_t oh, int64_t ot, const float* cs, const float* sn) {
  const int64_t BH = B * H;
  at::parallel_for(0, BH * n, GRAIN, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D), srow(D), zrow(D);
    int64_t last = -1;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / n, j = i % n, t = t0 + j;
      unpack_row(codes, bits, (bh * T + t) * D, D, row.data());
      if (tok) {
        const S* s = sc + (bh * T + t) * ng;
        const S* z = ze + (bh * T + t) * ng;
        for (int64_t g = 0; g < ng; ++g) {
          const float sg = tof(s[g]), zg = tof(z[g]);
          const int64_t d1 = std::min(D, (g + 1) * group);
          for (int64_t d = g * group; d < d1; ++d) row[d] = row[d] * sg + zg;
        }
      } else {
        const int64_t g = t / group, key = bh * ng + g;
        if (key != last) {
          for (int64_t d = 0; d < D; ++d) {
            srow[d] = tof(sc[(bh * D + d) * ng + g]);
            zrow[d] = tof(ze[(bh * D + d) * ng + g]);
          }
          last = key;
        }
        for (int64_t d = 0; d < D; ++d) row[d] = row[d] * srow[d] + zrow[d];
      }
      float* o = out + (bh / H) * ob + (bh % H) * oh + j * ot;
      write_row(row.data(), D, o, cs ? cs + j * D : nullptr, sn ? sn + j * D : nullptr);
    }
  });
}

const float* opt(const torch::Tensor& x) { return x.numel() ? x.data_ptr<float>() : nullptr; }

}  // namespace

void packed_tile(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, int64_t bits, int64_t B, int64_t H,
                 int64_t T, int64_t D, bool tok, int64_t group, int64_t t0, torch::Tensor out, torch::Tensor cos,
                 torch::Tensor sin) {
  const int64_t n = out.size(2);
  const int64_t ng = scale.numel() / (B * H * (tok ? T : D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "packed_tile", [&] {
    packed_impl<scalar_t>(codes.data_ptr<uint8_t>(), scale.data_ptr<scalar_t>(), zero.data_ptr<scalar_t>(),
                          (int)bits, B, H, T, D, tok, group, ng, t0, n, out.data_ptr<float>(), out.stride(0),
                          out.stride(1), out.stride(2), opt(cos), opt(sin));
  });
}

void dense_tile(torch::Tensor src, int64_t t0, torch::Tensor out, torch::Tensor cos, torch::Tensor sin) {
  const int64_t B = out.size(0), H = out.size(1), n = out.size(2), D = out.size(3);
  const float* cs = opt(cos);
  const float* sn = opt(sin);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dense_tile", [&] {
    const scalar_t* x = src.data_ptr<scalar_t>();
    const int64_t sb = src.stride(0), sh = src.stride(1), st = src.stride(2), sd = src.stride(3);
    float* o = out.data_ptr<float>();
    const int64_t ob = out.stride(0), oh = out.stride(1), ot = out.stride(2);
    at::parallel_for(0, B * H * n, GRAIN, [&](int64_t begin, int64_t end) {
      std::vector<float> row(D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / n, j = i % n, b = bh / H, h = bh % H;
        const scalar_t* r = x + b * sb + h * sh + (t0 + j) * st;
        for (int64_t d = 0; d < D; ++d) row[d] = tof(r[d * sd]);
        write_row(row.data(), D, o + b * ob + h * oh + j * ot, cs ? cs + j * D : nullptr, sn ? sn + j * D : nullptr);
      }
    });
  });
}

void split_tile(torch::Tensor normal, torch::Tensor special, torch::Tensor colmap, torch::Tensor out,
                torch::Tensor cos, torch::Tensor sin) {
  const int64_t B = out.size(0), H = out.size(1), n = out.size(2), D = out.size(3);
  const int64_t nn = normal.size(2), ns = special.size(2);
  const float* a = normal.data_ptr<float>();
  const float* s = special.data_ptr<float>();
  const int32_t* cm = colmap.data_ptr<int32_t>();
  const float* cs = opt(cos);
  const float* sn = opt(sin);
  float* o = out.data_ptr<float>();
  const int64_t ob = out.stride(0), oh = out.stride(1), ot = out.stride(2);
  at::parallel_for(0, B * H * n, GRAIN, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / n, j = i % n, b = bh / H, h = bh % H;
      const float* ar = a + (b * n + j) * nn;
      const float* sr = s + (b * n + j) * ns;
      const int32_t* c = cm + h * D;
      for (int64_t d = 0; d < D; ++d) row[d] = c[d] >= 0 ? ar[c[d]] : sr[-c[d] - 1];
      write_row(row.data(), D, o + b * ob + h * oh + j * ot, cs ? cs + j * D : nullptr, sn ? sn + j * D : nullptr);
    }
  });
}

void rope_tile(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  const int64_t B = x.size(0), H = x.size(1), n = x.size(2), D = x.size(3);
  float* p = x.data_ptr<float>();
  const int64_t xb = x.stride(0), xh = x.stride(1), xt = x.stride(2);
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  at::parallel_for(0, B * H * n, GRAIN, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / n, j = i % n;
      float* r = p + (bh / H) * xb + (bh % H) * xh + j * xt;
      for (int64_t d = 0; d < D; ++d) row[d] = r[d];
      write_row(row.data(), D, r, cs + j * D, sn + j * D);
    }
  });
}

namespace {

inline float loadf(const void* p, int64_t dt, int64_t i) {
  if (dt == 0) return static_cast<const float*>(p)[i];
  if (dt == 1) return static_cast<float>(static_cast<const at::Half*>(p)[i]);
  return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
}

// one source of rows (all heads of one token): meta row of 16 int64 (+16 +16 for a split's two parts)
struct Dec {
  const int64_t* m;
  std::vector<Dec> sub;
  std::vector<float> srow, zrow, a, b;
  int64_t last = -1;
  explicit Dec(const int64_t* meta) : m(meta) {
    if (m[0] == 2) {
      sub.emplace_back(meta + 16);
      sub.emplace_back(meta + 32);
      a.resize(sub[0].width());
      b.resize(sub[1].width());
    } else if (m[0] == 1) {
      srow.resize(m[6] * m[8]);
      zrow.resize(m[6] * m[8]);
    }
  }
  int64_t width() const { return m[0] == 1 ? m[6] * m[8] : m[2] * m[3]; }
  void row(int64_t bi, int64_t t, float* out) {
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
    // split: colmap, H, D; parts at +16 (normal), +32 (special)
    const int32_t* cm = reinterpret_cast<const int32_t*>(m[1]);
    sub[0].row(bi, t, a.data());
    sub[1].row(bi, t, b.data());
    const int64_t n = m[2] * m[3];
    for (int64_t i = 0; i < n; ++i) out[i] = cm[i] >= 0 ? a[cm[i]] : b[-cm[i] - 1];
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

}  // namespace

void decode_partial(torch::Tensor q, torch::Tensor kmeta, torch::Tensor vmeta, int64_t t0, int64_t t1,
                    torch::Tensor cos, torch::Tensor sin, torch::Tensor m, torch::Tensor l, torch::Tensor acc) {
  const int64_t B = q.size(0), Hk = q.size(1), G = q.size(2), D = q.size(3), n = t1 - t0;
  if (n <= 0) return;
  const int64_t HG = Hk * G;
  const float* qp = q.data_ptr<float>();
  const float* cs = opt(cos);
  const float* sn = opt(sin);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 256));
  const int64_t per = (n + nch - 1) / nch;
  const int64_t S = HG * (D + 2);
  std::vector<float> part(B * nch * S);
  at::parallel_for(0, B * nch, 1, [&](int64_t begin, int64_t end) {
    Dec kd(kmeta.data_ptr<int64_t>()), vd(vmeta.data_ptr<int64_t>());
    std::vector<float> krow(Hk * D), kr(D), vrow(Hk * D), s(TB * HG);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / nch, c = task % nch;
      const int64_t a0 = c * per, a1 = std::min(n, a0 + per);
      float* mm = part.data() + task * S;
      float* ll = mm + HG;
      float* ac = ll + HG;
      for (int64_t i = 0; i < HG; ++i) { mm[i] = -INFINITY; ll[i] = 0.f; }
      std::fill(ac, ac + HG * D, 0.f);
      const float* qb = qp + bi * HG * D;
      for (int64_t j0 = a0; j0 < a1; j0 += TB) {
        const int64_t nb = std::min(TB, a1 - j0);
        for (int64_t jj = 0; jj < nb; ++jj) {
          const int64_t j = j0 + jj;
          kd.row(bi, t0 + j, krow.data());
          for (int64_t h = 0; h < Hk; ++h) {
            const float* k = krow.data() + h * D;
            if (cs) {
              const float* __restrict c = cs + j * D;
              const float* __restrict si = sn + j * D;
              const float* __restrict kk = k;
              float* __restrict out = kr.data();
              const int64_t hd = D / 2;
#pragma omp simd
              for (int64_t d = 0; d < hd; ++d) {
                out[d] = kk[d] * c[d] - kk[d + hd] * si[d];
                out[d + hd] = kk[d + hd] * c[d + hd] + kk[d] * si[d + hd];
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
          if (bm > mm[i]) {
            const float f = mm[i] == -INFINITY ? 0.f : std::exp(mm[i] - bm);
            ll[i] *= f;
            float* a = ac + i * D;
            for (int64_t d = 0; d < D; ++d) a[d] *= f;
            mm[i] = bm;
          }
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
  float* M = m.data_ptr<float>();
  float* L = l.data_ptr<float>();
  float* A = acc.data_ptr<float>();
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
"""

FUNCTIONS = ["packed_tile", "dense_tile", "split_tile", "rope_tile", "decode_partial"]

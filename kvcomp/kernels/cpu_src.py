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
- ``decode_partial_generic``: one decode step's attention straight from a block pair's codes (``decode.py``):
  each thread decodes rows of its share of the tokens (dense / packed / channel-split / sparse sources described
  by ``cpu.py``'s int64 meta rows), applies RoPE in registers, and keeps an online softmax per query head;
  the threads' partial (max, sum, accumulator) are merged into the running state in place;
- ``decode_partial``: the same step, vectorised (``cpu_fast_src.py``, AVX-512: codes decoded into registers,
  tiles of 16 tokens), the generic kernel where AVX-512 or the head dim does not allow it;
- ``decode_layer``: the vectorised step over all of a layer's segments in one call (``cpu_layer_src.py``): stacked
  meta rows, one parallel region over the total tokens, one merge;
- ``meta_tile``: a tile of any block the decode kernels read, from its meta row (``cpu_tile_src.py``): channel
  splits and sparse outliers decoded per token in one pass;
- ``quantize_pack``: ``kvcomp.cache.quant.quantize`` (range, fp16 scale and zero point, codes, bit packing) in one
  pass (``cpu_quant_src.py``).
"""

from kvcomp.kernels.cpu_decode_src import DECODE_SOURCE
from kvcomp.kernels.cpu_fast_src import FAST_SOURCE
from kvcomp.kernels.cpu_layer_src import LAYER_SOURCE
from kvcomp.kernels.cpu_quant_src import QUANT_SOURCE
from kvcomp.kernels.cpu_tile_src import TILE_SOURCE

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// rows (of D elements) per thread at least: smaller tiles run on the calling thread (a parallel region costs
// more than it saves there, and far more on a loaded machine)
constexpr int64_t GRAIN = 4096;

template <typename S>
inline float tof(S x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
// lane tables of the vectorised unpack: chunk k of a 16-byte block, lane l reads byte (16k + l) / per and shifts it by
// bits * (l % per) (per = 8 / bits codes a byte)
alignas(64) const int32_t UNPACK_IX2[2][16] = {
    {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7},
    {8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15}};
alignas(64) const int32_t UNPACK_IX4[4][16] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};
alignas(64) const int32_t UNPACK_SH2[16] = {0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4};
alignas(64) const int32_t UNPACK_SH4[16] = {0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6};
#endif

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
  // 2/4 bit: the codes before the row's first whole byte (a row starting inside a byte, e.g. the normal part of a
  // channel split with an odd width), the whole bytes, then the codes of a last partial byte
  const int per = 8 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const uint8_t* c = codes + e0 / per;
  int64_t d = 0;
  int sh = (int)(e0 % per) * bits;
  if (sh) {
    for (; d < D && sh < 8; ++d, sh += bits) row[d] = (float)((*c >> sh) & mask);
    ++c;
  }
#if defined(__AVX512F__)
  // whole 16-byte blocks: 16 codes per zmm (lane l of chunk k: byte (16k + l) / per, shift bits * (l % per))
  if (D - d >= 16 * per) {
    const int32_t(*ix)[16] = per == 2 ? UNPACK_IX2 : UNPACK_IX4;
    const __m512i shv = _mm512_load_si512(per == 2 ? UNPACK_SH2 : UNPACK_SH4), mv = _mm512_set1_epi32((int)mask);
    for (; D - d >= 16 * per; d += 16 * per, c += 16) {
      const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
      for (int k = 0; k < per; ++k) {
        const __m512i x = _mm512_srlv_epi32(_mm512_permutexvar_epi32(_mm512_load_si512(ix[k]), w), shv);
        _mm512_storeu_ps(row + d + 16 * k, _mm512_cvtepi32_ps(_mm512_and_si512(x, mv)));
      }
    }
  }
#endif
  const int64_t nb = (D - d) / per;
  float* r = row + d;
  if (bits == 4) {
    for (int64_t k = 0; k < nb; ++k) {
      const uint8_t byte = c[k];
      r[2 * k] = (float)(byte & 15u);
      r[2 * k + 1] = (float)(byte >> 4);
    }
  } else {
    for (int64_t k = 0; k < nb; ++k) {
      const uint8_t byte = c[k];
      r[4 * k] = (float)(byte & 3u);
      r[4 * k + 1] = (float)((byte >> 2) & 3u);
      r[4 * k + 2] = (float)((byte >> 4) & 3u);
      r[4 * k + 3] = (float)(byte >> 6);
    }
  }
  d += nb * per;
  c += nb;
  for (sh = 0; d < D; ++d, sh += bits) row[d] = (float)((*c >> sh) & mask);
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
"""

FUNCTIONS = ["packed_tile", "dense_tile", "split_tile", "rope_tile", "decode_partial", "decode_partial_generic",
             "decode_layer", "meta_tile", "quantize_pack"]
#: the whole extension: these shared helpers and tile kernels, then the generic decode kernel (``cpu_decode_src.py``)
#: the vectorised one (``cpu_fast_src.py``) and the whole-layer entry over both (``cpu_layer_src.py``)
SOURCE = SOURCE + DECODE_SOURCE + FAST_SOURCE + LAYER_SOURCE + TILE_SOURCE + QUANT_SOURCE

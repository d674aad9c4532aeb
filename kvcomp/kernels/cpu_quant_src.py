"""C++ source of ``quantize_pack`` (appended to ``cpu_src.SOURCE``): ``kvcomp.cache.quant.quantize`` in one pass.

``quantize_pack(x, lo, hi, bits, token_axis, g) -> [codes, scale, zero]`` for a contiguous float32 ``x``
``[B, H, T, D]``: groups of ``g`` elements along the head dim (``token_axis``) or along the tokens (else), the last
group padded by repeating the last element; range per group = its min / max, or the given float32 ``lo`` / ``hi``
(contiguous, the grouped shape ``[B, H, R, n_groups, 1]``; empty = from the data); scale and zero point rounded
to fp16 (fp32 when a statistic is at or above 60000 in magnitude) exactly as the torch code rounds them (zero down,
scale up, so the range is covered); codes ``round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]`` (ties to
even), bit-packed along the flat ``[B, H, T, D]`` order as ``kvcomp.cache.packing`` packs (2 / 4 bit: code ``i``
of a byte at bit ``bits * i``; 3 bit: 8 codes in 3 little-endian bytes; 8 bit: one byte). The plain-torch
reference is ``quant.quantize_reference``; tests/test_cpu_kernels.py holds them bit-equal.
"""

QUANT_SOURCE = r"""
namespace {

inline uint16_t half_bits(c10::Half h) { return h.x; }

inline c10::Half half_next(c10::Half h, bool up) {
  // the next fp16 value towards +inf (up) or -inf, as IEEE nextafter (NaN and the infinity it moves away from kept)
  const uint16_t b = half_bits(h), mag = b & 0x7fff;
  const bool neg = b & 0x8000;
  if (mag > 0x7c00) return h;
  if (mag == 0) return c10::Half(up ? 0x0001 : 0x8001, c10::Half::from_bits());
  if (mag == 0x7c00 && up == neg) return h;
  return c10::Half(static_cast<uint16_t>(up != neg ? b + 1 : b - 1), c10::Half::from_bits());
}

// one group's (scale, zero) from its range, rounded as the torch reference rounds them; returns them as floats
template <typename S>
inline void group_stats(float lo, float hi, float levels, S* scale, S* zero, float* sf, float* zf);

template <>
inline void group_stats<c10::Half>(float lo, float hi, float levels, c10::Half* scale, c10::Half* zero, float* sf,
                                   float* zf) {
  c10::Half z(lo);
  if (static_cast<float>(z) > lo) z = half_next(z, false);
  const float zv = z;
  const float a = hi / levels, c = zv / levels;
  float s = a - c;
  s = s < 0.f ? 0.f : s;
  c10::Half sh(s);
  volatile float top = static_cast<float>(sh) * levels;  // rounded alone, as torch does (no fused multiply-add)
  if (top + zv < hi) sh = half_next(sh, true);
  *scale = sh;
  *zero = z;
  *sf = sh;
  *zf = zv;
}

template <>
inline void group_stats<float>(float lo, float hi, float levels, float* scale, float* zero, float* sf, float* zf) {
  const float a = hi / levels, c = lo / levels;
  float s = a - c;
  s = s < 0.f ? 0.f : s;
  volatile float top = s * levels;
  if (top + lo < hi) s = std::nextafter(s, INFINITY);
  *scale = s;
  *zero = lo;
  *sf = s;
  *zf = lo;
}

// v in [0, 255] rounded half to even (the current rounding mode, as nearbyint; vectorises, unlike the libm call):
// adding and subtracting 1.5 * 2**23 leaves no fraction bits (IEEE arithmetic: the build has no -ffast-math, so the
// compiler keeps both operations). Clamping before rounding equals rounding before clamping to integer bounds.
inline float round_even(float v) { return (v + 12582912.f) - 12582912.f; }

// codes of n elements sharing one (zero, scale): round((x - zero) / scale) clamped to [0, levels], ties to even
inline void code_run(const float* x, uint8_t* q, int64_t n, float z, float s, float levels) {
  const float div = s > 0.f ? s : 1.f;
  for (int64_t i = 0; i < n; ++i) {
    float v = ((x[i] - z) / div);
    v = v < 0.f ? 0.f : (v > levels ? levels : v);
    q[i] = static_cast<uint8_t>(round_even(v));
  }
}

// codes of one token's n channels, each with its own zero point and divisor
inline void code_cols(const float* x, uint8_t* q, int64_t n, const float* z, const float* div, float levels) {
  for (int64_t i = 0; i < n; ++i) {
    float v = ((x[i] - z[i]) / div[i]);
    v = v < 0.f ? 0.f : (v > levels ? levels : v);
    q[i] = static_cast<uint8_t>(round_even(v));
  }
}

// each group's min and max into lo / hi ([B*H, R, n_groups])
void group_ranges(const float* x, int64_t BH, int64_t T, int64_t D, bool token_axis, int64_t g, int64_t ng,
                  float* lo, float* hi) {
  const int64_t R = token_axis ? T : D;
  at::parallel_for(0, BH, std::max<int64_t>(1, GRAIN / std::max<int64_t>(1, T)), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* xb = x + bh * T * D;
      float* l = lo + bh * R * ng;
      float* h = hi + bh * R * ng;
      if (token_axis) {
        for (int64_t t = 0; t < T; ++t)
          for (int64_t gi = 0; gi < ng; ++gi) {
            const int64_t k0 = gi * g, k1 = std::min(k0 + g, D);
            float mn = xb[t * D + k0], mx = mn;
            for (int64_t k = k0 + 1; k < k1; ++k) {
              const float v = xb[t * D + k];
              mn = v < mn ? v : mn;
              mx = v > mx ? v : mx;
            }
            l[t * ng + gi] = mn;
            h[t * ng + gi] = mx;
          }
        continue;
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t gi = t / g;
        const bool first = t % g == 0;
        for (int64_t d = 0; d < D; ++d) {
          const float v = xb[t * D + d];
          float& mn = l[d * ng + gi];
          float& mx = h[d * ng + gi];
          if (first) { mn = v; mx = v; }
          else { mn = v < mn ? v : mn; mx = v > mx ? v : mx; }
        }
      }
    }
  });
}

// scale / zero of every group from lo / hi, then the codes (one byte each, unpacked) of every element
template <typename S>
void quantize_rows(const float* x, const float* lo, const float* hi, int64_t BH, int64_t T, int64_t D,
                   bool token_axis, int64_t g, int64_t ng, float levels, S* scale, S* zero, uint8_t* q) {
  const int64_t R = token_axis ? T : D;
  at::parallel_for(0, BH, std::max<int64_t>(1, GRAIN / std::max<int64_t>(1, T)), [&](int64_t begin, int64_t end) {
    std::vector<float> sf(R * ng), zf(R * ng), zrow(D), srow(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* xb = x + bh * T * D;
      const int64_t s0 = bh * R * ng;
      for (int64_t i = 0; i < R * ng; ++i)
        group_stats<S>(lo[s0 + i], hi[s0 + i], levels, scale + s0 + i, zero + s0 + i, &sf[i], &zf[i]);
      uint8_t* qb = q + bh * T * D;
      if (token_axis) {
        for (int64_t t = 0; t < T; ++t)
          for (int64_t gi = 0; gi < ng; ++gi) {
            const int64_t k0 = gi * g, k1 = std::min(k0 + g, D);
            code_run(xb + t * D + k0, qb + t * D + k0, k1 - k0, zf[t * ng + gi], sf[t * ng + gi], levels);
          }
        continue;
      }
      for (int64_t gi = 0; gi < ng; ++gi) {
        for (int64_t d = 0; d < D; ++d) {  // this token group's per-channel (zero, divisor) as rows
          zrow[d] = zf[d * ng + gi];
          srow[d] = sf[d * ng + gi] > 0.f ? sf[d * ng + gi] : 1.f;
        }
        for (int64_t t = gi * g; t < std::min((gi + 1) * g, T); ++t)
          code_cols(xb + t * D, qb + t * D, D, zrow.data(), srow.data(), levels);
      }
    }
  });
}

// codes (one per byte) packed as kvcomp.cache.packing packs them
torch::Tensor pack_codes(const torch::Tensor& q, int64_t bits) {
  const int64_t N = q.numel();
  const uint8_t* c = q.data_ptr<uint8_t>();
  if (bits == 3) {  // 8 codes -> one 24-bit word -> 3 little-endian bytes
    const int64_t words = (N + 7) / 8;
    auto out = torch::empty({words * 3}, q.options());
    uint8_t* o = out.data_ptr<uint8_t>();
    for (int64_t w = 0; w < words; ++w) {
      uint32_t word = 0;
      for (int64_t i = 0; i < 8 && w * 8 + i < N; ++i) word |= static_cast<uint32_t>(c[w * 8 + i]) << (3 * i);
      o[3 * w] = word & 0xff;
      o[3 * w + 1] = (word >> 8) & 0xff;
      o[3 * w + 2] = (word >> 16) & 0xff;
    }
    return out;
  }
  const int64_t per = 8 / bits, bytes = (N + per - 1) / per, whole = N / per;
  auto out = torch::empty({bytes}, q.options());
  uint8_t* o = out.data_ptr<uint8_t>();
  if (bits == 4)
    for (int64_t w = 0; w < whole; ++w) o[w] = static_cast<uint8_t>(c[2 * w] | (c[2 * w + 1] << 4));
  else
    for (int64_t w = 0; w < whole; ++w)
      o[w] = static_cast<uint8_t>(c[4 * w] | (c[4 * w + 1] << 2) | (c[4 * w + 2] << 4) | (c[4 * w + 3] << 6));
  if (whole < bytes) {  // the last, partly filled byte
    uint32_t byte = 0;
    for (int64_t i = 0; whole * per + i < N; ++i) byte |= static_cast<uint32_t>(c[whole * per + i]) << (bits * i);
    o[whole] = static_cast<uint8_t>(byte);
  }
  return out;
}

}  // namespace

std::vector<torch::Tensor> quantize_pack(torch::Tensor x, torch::Tensor lo, torch::Tensor hi, int64_t bits,
                                         bool token_axis, int64_t g) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 4, "x: contiguous float32 [B,H,T,D]");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits: 2, 3, 4 or 8");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  const int64_t R = token_axis ? T : D, n = token_axis ? D : T;
  const int64_t ng = (n + g - 1) / g;
  const float levels = static_cast<float>((1 << bits) - 1);
  const bool given = lo.numel() > 0;
  if (given)
    TORCH_CHECK(lo.scalar_type() == at::kFloat && hi.scalar_type() == at::kFloat && lo.is_contiguous() &&
                hi.is_contiguous() && lo.numel() == B * H * R * ng && hi.numel() == lo.numel(), "lo/hi: grouped shape");
  std::vector<float> ranges(given ? 0 : 2 * B * H * R * ng);
  const float* lp = given ? lo.data_ptr<float>() : ranges.data();
  const float* hp = given ? hi.data_ptr<float>() : ranges.data() + B * H * R * ng;
  if (!given)
    group_ranges(x.data_ptr<float>(), B * H, T, D, token_axis, g, ng, ranges.data(), ranges.data() + B * H * R * ng);
  // fp16 statistics unless one would overflow it: the largest |min| / |max| of any group decides, as in the torch code
  float big = 0.f;
  bool nan = false;
  for (int64_t i = 0; i < B * H * R * ng; ++i) {
    const float m = std::max(std::fabs(lp[i]), std::fabs(hp[i]));
    nan |= std::isnan(lp[i]) || std::isnan(hp[i]);
    big = m > big ? m : big;
  }
  const bool half = !nan && big < 60000.f;
  auto opts = x.options().dtype(half ? at::kHalf : at::kFloat);
  auto scale = torch::empty({B, H, R, ng, 1}, opts);
  auto zero = torch::empty({B, H, R, ng, 1}, opts);
  auto q = torch::empty({B * H * T * D}, x.options().dtype(at::kByte));
  if (half)
    quantize_rows<c10::Half>(x.data_ptr<float>(), lp, hp, B * H, T, D, token_axis, g, ng, levels,
                             scale.data_ptr<c10::Half>(), zero.data_ptr<c10::Half>(), q.data_ptr<uint8_t>());
  else
    quantize_rows<float>(x.data_ptr<float>(), lp, hp, B * H, T, D, token_axis, g, ng, levels,
                         scale.data_ptr<float>(), zero.data_ptr<float>(), q.data_ptr<uint8_t>());
  return {bits == 8 ? q : pack_codes(q, bits), scale, zero};
}
"""

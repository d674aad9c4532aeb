"""C++ source of ``decode_layer``: one decode step's attention over a whole layer in one call (appended after
``cpu_fast_src.py``, whose ``fold_range`` / ``decode_fast`` it uses, and ``cpu_decode_src.py``).

A layer's stored segments come as stacked int64 meta rows (``kmeta`` / ``vmeta`` ``[S, 48]``, ``cpu.py``) with
``seg`` ``[S, 3]`` (tokens, address of the int32 positions or 0 = not rotated, 1 + the largest position); the
full-precision tail (the residual, pre-RoPE, and this step's own post-RoPE K/V) as tensors ``dense`` = (k, v, pos)
triples (``pos`` empty: not rotated), whose meta rows are built here. The query ``[B, Hkv, G, D]`` float32 is
scaled here. The total tokens of all segments are split over the threads in one parallel region (flash-decoding);
a thread's range may span segments, each read by its own sources (``Src``) into the same running state; the
partial states are merged once. Returns (out ``[B, Hkv*G, 1, D]``, lse ``[B, Hkv*G, 1]``) float32. Without
AVX-512 or for other head dims: the generic kernel, one call per segment (``decode_partial_generic``).
"""

LAYER_SOURCE = r"""
namespace {

struct Seg {
  const int64_t* km;
  const int64_t* vm;
  int64_t n;
  const int32_t* pos;
};

void dense_row(const torch::Tensor& x, int64_t* row) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "decode_layer: a dense tail tensor needs a contiguous last dim");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "decode_layer: dense tail dtype");
  std::fill(row, row + 48, 0);
  row[0] = 0;
  row[1] = reinterpret_cast<int64_t>(x.data_ptr());
  row[2] = st == at::kFloat ? 0 : (st == at::kHalf ? 1 : 2);
  row[3] = x.stride(0); row[4] = x.stride(1); row[5] = x.stride(2); row[6] = x.size(1); row[7] = x.size(3);
}

}  // namespace

std::vector<torch::Tensor> decode_layer(torch::Tensor query, double scale, torch::Tensor kmeta, torch::Tensor vmeta,
                                        torch::Tensor seg, std::vector<torch::Tensor> dense, torch::Tensor cos,
                                        torch::Tensor sin) {
  const int64_t B = query.size(0), Hk = query.size(1), G = query.size(2), D = query.size(3), HG = Hk * G;
  const int64_t S = seg.size(0), P = cos.numel() ? cos.size(0) : 0;
  TORCH_CHECK(dense.size() % 3 == 0, "decode_layer: dense tail as (k, v, pos) triples");
  torch::Tensor q = (query.to(torch::kFloat) * scale).contiguous();
  std::vector<Seg> segs;
  const int64_t* sg = seg.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int32_t* pp = reinterpret_cast<const int32_t*>(sg[3 * s + 1]);
    TORCH_CHECK(!pp || !cos.numel() || sg[3 * s + 2] <= P, "decode_layer: position ", sg[3 * s + 2] - 1,
                " outside the rope table of ", P);
    segs.push_back({kmeta.data_ptr<int64_t>() + 48 * s, vmeta.data_ptr<int64_t>() + 48 * s, sg[3 * s], pp});
  }
  const int64_t nd = (int64_t)dense.size() / 3;
  std::vector<int64_t> rows(2 * 48 * std::max<int64_t>(nd, 1));
  for (int64_t i = 0; i < nd; ++i) {
    const torch::Tensor& p = dense[3 * i + 2];
    const int32_t* pp = p.numel() ? p.data_ptr<int32_t>() : nullptr;
    for (int64_t j = 0; pp && cos.numel() && j < p.numel(); ++j)
      TORCH_CHECK(pp[j] < P, "decode_layer: position ", pp[j], " outside the rope table of ", P);
    dense_row(dense[3 * i], rows.data() + 96 * i);
    dense_row(dense[3 * i + 1], rows.data() + 96 * i + 48);
    segs.push_back({rows.data() + 96 * i, rows.data() + 96 * i + 48, dense[3 * i].size(2), pp});
  }
  auto M = torch::full({B, Hk, G}, -INFINITY, q.options());
  auto L = torch::zeros({B, Hk, G}, q.options());
  auto A = torch::zeros({B, Hk, G, D}, q.options());
  const float* cs = opt(cos);
  const float* sn = opt(sin);
  const int64_t RD = cos.numel() ? cos.size(1) : D;
  int64_t N = 0;
  for (const Seg& s : segs) N += s.n;
  bool fast = false;
#if defined(__AVX512F__)
  fast = D == 32 || D == 64 || D == 128;
  auto run = [&](auto nc) {
    constexpr int NC = decltype(nc)::value;
    Parts parts(B, N, HG, D);
    at::parallel_for(0, parts.tasks(), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sv(fold_scratch(Hk, G, D));
      for (int64_t task = begin; task < end; ++task) {
        int64_t bi, a0, a1;
        float* mm = parts.start(task, bi, a0, a1);
        int64_t o = 0;
        for (const Seg& s : segs) {
          if (o < a1 && o + s.n > a0) {
            Src kd(s.km, Hk, D), vd(s.vm, Hk, D);
            fold_range<NC>(kd, vd, bi, q.data_ptr<float>() + bi * HG * D, Hk, G, 0, std::max(a0, o) - o,
                           std::min(a1, o + s.n) - o, s.n, s.pos, s.pos ? cs : nullptr, sn, RD, sv.data(), mm,
                           mm + HG, mm + 2 * HG);
          }
          o += s.n;
        }
      }
    });
    parts.merge(M.data_ptr<float>(), L.data_ptr<float>(), A.data_ptr<float>());
  };
  if (N > 0) {
    if (D == 32) run(std::integral_constant<int, 2>());
    else if (D == 64) run(std::integral_constant<int, 4>());
    else if (D == 128) run(std::integral_constant<int, 8>());
  }
#endif
  if (!fast) {
    const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
    const auto i32 = torch::TensorOptions().dtype(torch::kInt32);
    const torch::Tensor none = torch::empty({0});
    for (const Seg& s : segs) {
      if (s.n <= 0) continue;
      auto km = torch::from_blob(const_cast<int64_t*>(s.km), {48}, i64);
      auto vm = torch::from_blob(const_cast<int64_t*>(s.vm), {48}, i64);
      auto ps = s.pos ? torch::from_blob(const_cast<int32_t*>(s.pos), {s.n}, i32) : torch::empty({0}, i32);
      decode_partial_generic(q, km, vm, 0, s.n, ps, s.pos ? cos : none, s.pos ? sin : none, M, L, A);
    }
  }
  auto out = (A / L.unsqueeze(-1)).reshape({B, HG, 1, D});
  auto lse = (M + L.log()).reshape({B, HG, 1});
  return {out, lse};
}
"""

"""C++ source of ``meta_tile`` (appended to ``cpu_src.SOURCE`` after the decode kernel, whose ``Dec`` row reader and
``write_row`` it uses): tokens ``[t0, t0 + n)`` of any stored block the decode kernel reads (dense, packed,
channel-split, dense-and-sparse; described by its int64 meta row, ``cpu.py``) written as float32 rows
``out[b, h, j, :]`` (``out`` ``[B, H, n, D]``, any strides, last dim contiguous), rotated by split-half RoPE with
``cos``/``sin`` ``[n, D]`` (empty: no rotation), in one pass: a channel split's parts and a sparse block's outliers
are decoded per token into one row buffer, no part tiles or outlier index tensors are built.
The plain-torch reference is each block's ``tile_reference`` (``cache/tiles.py``) + ``cpu.rotate_rows``.
"""

TILE_SOURCE = r"""
void meta_tile(torch::Tensor meta, int64_t t0, torch::Tensor out, torch::Tensor cos, torch::Tensor sin) {
  const int64_t B = out.size(0), H = out.size(1), n = out.size(2), D = out.size(3);
  const int64_t* m = meta.data_ptr<int64_t>();
  const float* cs = opt(cos);
  const float* sn = opt(sin);
  float* o = out.data_ptr<float>();
  const int64_t ob = out.stride(0), oh = out.stride(1), ot = out.stride(2);
  at::parallel_for(0, B * n, std::max<int64_t>(1, GRAIN / H), [&](int64_t begin, int64_t end) {
    Dec dec(m);
    std::vector<float> row(H * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / n, j = i % n;
      dec.row(b, t0 + j, row.data());
      for (int64_t h = 0; h < H; ++h)
        write_row(row.data() + h * D, D, o + b * ob + h * oh + j * ot, cs ? cs + j * D : nullptr,
                  sn ? sn + j * D : nullptr);
    }
  });
}
"""

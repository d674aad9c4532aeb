"""Decode attention that reads the compressed cache's packed blocks directly (no full-precision cache).

``decode_attention(query, layer, new_k, new_v, impl=...)`` computes one decode step's attention over a
``CompressedLayer``:

- ``"reference"`` (``reference.py``): pure PyTorch, tile by tile into a reused workspace, every block type;
- ``"triton"`` (``triton_decode.py``): one fused kernel launch per block layout for the packed 2/4/8-bit
  blocks (with sparse outliers and RoPE), the reference for everything else; needs ``triton`` and CUDA
  (or ``TRITON_INTERPRET=1`` on CPU);
- ``"auto"`` (default): ``"triton"`` for CUDA tensors when triton is installed, else ``"reference"``.

In a compressed run the model's attention is ``interface.py``'s ``kvcomp_packed`` function: on CPU prefill
chunks and decode steps read the packed blocks tile by tile (``chunk.py``); on CUDA decode steps use the Triton
kernel and prefill chunks the same kernel over their history (``triton_chunk.py``), each once it passed its
first-use self-check (``dispatch.py``).
"""

from __future__ import annotations

from typing import Any

import torch

IMPLS = ("auto", "reference", "triton")


def resolve(impl: str, query: torch.Tensor) -> str:
    """The implementation ``impl`` stands for with this ``query``'s device."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not a decode attention implementation; allowed: {', '.join(IMPLS)}")
    if impl == "auto":
        from kvcomp.kernels import triton_decode

        return "triton" if query.is_cuda and triton_decode.available() else "reference"
    return impl


def decode_attention(query: torch.Tensor, layer: Any, new_k: torch.Tensor | None = None,
                     new_v: torch.Tensor | None = None, *, scale: float | None = None, impl: str = "auto",
                     **kw: Any) -> torch.Tensor:
    """Attention of one query step ``query`` ``[B, Hq, 1, D]`` over ``layer`` (+ post-RoPE ``new_k``/``new_v``
    ``[B, Hkv, q, D]``); ``Hq`` a multiple of the layer's ``Hkv`` (GQA). Returns ``[B, Hq, 1, D]`` in
    ``query.dtype``; ``scale`` defaults to ``D ** -0.5``. ``kw`` go to the chosen implementation."""
    if resolve(impl, query) == "triton":
        from kvcomp.kernels import triton_decode

        return triton_decode.decode_attention_triton(query, layer, new_k, new_v, scale=scale, **kw)
    from kvcomp.kernels.reference import decode_attention_reference

    return decode_attention_reference(query, layer, new_k, new_v, scale=scale, **kw)


__all__ = ["IMPLS", "decode_attention", "resolve"]

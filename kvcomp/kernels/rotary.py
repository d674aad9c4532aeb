"""The plain LLaMA (split-half) rotation, shared by the kernels and ``Rope`` (``model/rope.py``)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` of ``x`` ``[..., D]`` split in halves ``x1 | x2``."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Split-half RoPE ``x * cos + rotate_half(x) * sin`` in fp32 (LLaMA layout; kernels' reference)."""
    x = x.float()
    return x * cos + rotate_half(x) * sin

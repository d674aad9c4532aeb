"""Quantizer interface. Components are stateless; per-layer state (EMA statistics) lives in the cache.

The compressed cache calls, for each layer and each run of tokens it flushes out of its full-precision
residual::

    segments = quantizer.compress(keys, values, positions, state, token_bits)

with ``keys``/``values`` ``[B, H, T, D]`` (keys pre-RoPE when ``pre_rope``), ``positions`` ``[T]``
absolute token positions (int64), ``state`` the layer's dict from ``init_state()`` (mutated in place),
and ``token_bits`` an optional ``[T]`` int tensor from a precision policy (0 = dropped before this call
never happens; 16 = keep fp16; 2/3/4/8 = width wanted for that token). The segments together must cover
every one of the T tokens exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.cache.storage import Segment

PACK_BITS = (2, 3, 4, 8)


@dataclass
class Quantizer:
    """Base quantizer; subclasses implement ``compress`` (and ``init_state`` when they keep statistics).

    ``pre_rope``: quantize keys before rotary embedding (the cache re-applies RoPE after dequantizing).
    ``residual_length``: most recent tokens kept in full precision (KIVI-style) until flushed.
    ``flush_group``: during decode, tokens are flushed from the residual in groups of this many.
    """

    pre_rope: bool = True
    residual_length: int = 0
    flush_group: int = 32

    def init_state(self) -> dict[str, Any]:
        """Fresh per-layer state (e.g. EMA statistics). Tensors in it count toward kv_bytes."""
        return {}

    def compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        state: dict[str, Any],
        token_bits: torch.Tensor | None = None,
    ) -> list[Segment]:
        """Store ``[B, H, T, D]`` keys/values; return segments covering all T tokens."""
        raise NotImplementedError

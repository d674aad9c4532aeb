"""``quantizer=none``: keep K/V exactly as the model produced them (full-precision reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.cache.storage import Dense, Segment
from kvcomp.quantizer.base import Quantizer
from kvcomp.registry import QUANTIZERS


@QUANTIZERS.register("none")
@dataclass
class NoQuantizer(Quantizer):
    """Stores ``[B, H, T, D]`` K/V in the model dtype, post-RoPE keys (bit-exact with a plain cache)."""

    pre_rope: bool = False

    def compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        state: dict[str, Any],
        token_bits: torch.Tensor | None = None,
        decode: bool = False,
    ) -> list[Segment]:
        return self.store(keys, values, positions, state, token_bits)

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, state: dict[str, Any],
              token_bits: torch.Tensor | None = None) -> list[Segment]:
        """Re-store kept tokens (a late drop pass, ``cache/rewrite.py``) as given: nothing to re-encode."""
        return [Segment(Dense(keys), Dense(values))]

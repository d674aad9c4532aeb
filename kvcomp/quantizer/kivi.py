"""``quantizer=kivi``: KIVI (Liu et al., 2024) — per-channel keys, per-token values, fp residual.

Keys ``[B, H, T, D]`` are quantized per channel over groups of ``group_size`` tokens, values per token
over groups of ``group_size`` channels (asymmetric min/max, see ``kvcomp.cache.quant``). The most
recent ``residual_length`` tokens stay in full precision and are flushed ``group_size`` at a time during
decode, so every key group is full-length. KIVI quantizes post-RoPE keys; ``pre_rope=true`` is an option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.cache.quant import quantize
from kvcomp.cache.storage import Stored
from kvcomp.fields import param
from kvcomp.quantizer.base import PACK_BITS, Quantizer
from kvcomp.registry import QUANTIZERS


@QUANTIZERS.register("kivi")
@dataclass
class Kivi(Quantizer):
    """KIVI-``bits``: ``key_bits``/``value_bits`` (2 in the paper), ``group_size`` 32, residual 128."""

    key_bits: int = param(2, choices=PACK_BITS)
    value_bits: int = param(2, choices=PACK_BITS)
    group_size: int = param(32, gt=0)
    residual_length: int = 128
    pre_rope: bool = False

    def __post_init__(self) -> None:
        self.flush_group = self.group_size  # decode flushes whole key groups

    def widths(self, state: dict[str, Any]) -> tuple[int, int]:
        return self.key_bits, self.value_bits

    def encode(self, keys: torch.Tensor, values: torch.Tensor, key_bits: int, value_bits: int,
               state: dict[str, Any]) -> tuple[Stored, Stored]:
        return (quantize(keys, key_bits, "channel", self.group_size),
                quantize(values, value_bits, "token", self.group_size))

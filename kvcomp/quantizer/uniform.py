"""``quantizer=uniform``: asymmetric INT-k with min/max per group, keys and values configured apart.

For ``x`` [B, H, T, D] and a group ``x_g`` (``*_axis="token"``: ``group_size`` channels of one token;
``"channel"``: ``group_size`` tokens of one channel, 0 = the whole run)::

    scale = (max x_g - min x_g) / (2**bits - 1),  code = round((x - min x_g) / scale)  (bits-bit, packed)

Per-token widths from a precision policy replace ``key_bits``/``value_bits`` token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.cache.quant import quantize
from kvcomp.cache.storage import Stored
from kvcomp.errors import ConfigError
from kvcomp.quantizer.base import Quantizer, check_axis, check_bits
from kvcomp.registry import QUANTIZERS


@QUANTIZERS.register("uniform")
@dataclass
class Uniform(Quantizer):
    """INT-``key_bits`` keys and INT-``value_bits`` values (2, 3, 4 or 8; 16 = keep fp16)."""

    key_bits: int = 4
    value_bits: int = 4
    key_axis: str = "token"
    value_axis: str = "token"
    key_group_size: int = 0
    value_group_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits("quantizer.key_bits", self.key_bits, (2, 3, 4, 8, 16))
        check_bits("quantizer.value_bits", self.value_bits, (2, 3, 4, 8, 16))
        check_axis("quantizer.key_axis", self.key_axis)
        check_axis("quantizer.value_axis", self.value_axis)
        for key in ("key_group_size", "value_group_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"quantizer.{key}={v} must be an integer >= 0 (0 = the whole axis)")

    def widths(self, state: dict[str, Any]) -> tuple[int, int]:
        return self.key_bits, self.value_bits

    def encode(self, keys: torch.Tensor, values: torch.Tensor, key_bits: int, value_bits: int,
               state: dict[str, Any]) -> tuple[Stored, Stored]:
        return (quantize(keys, key_bits, self.key_axis, self.key_group_size),
                quantize(values, value_bits, self.value_axis, self.value_group_size))

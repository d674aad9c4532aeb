"""``quantizer=uniform``: asymmetric INT-k with min/max per group, keys and values configured apart.

For ``x`` [B, H, T, D] and a group ``x_g`` (``*_axis="token"``: ``group_size`` channels of one token;
``"channel"``: ``group_size`` tokens of one channel, 0 = the whole run)::

    scale = (max x_g - min x_g) / (2**bits - 1),  code = round((x - min x_g) / scale)  (bits-bit, packed)

Per-token widths from a precision policy replace ``key_bits``/``value_bits`` token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from kvcomp.cache.quant import quantize
from kvcomp.cache.storage import Stored
from kvcomp.fields import param
from kvcomp.quantizer.base import WIDTHS, Quantizer
from kvcomp.registry import QUANTIZERS


@QUANTIZERS.register("uniform")
@dataclass
class Uniform(Quantizer):
    """INT-``key_bits`` keys and INT-``value_bits`` values (2, 3, 4 or 8; 16 = keep fp16)."""

    key_bits: int = param(4, choices=WIDTHS)
    value_bits: int = param(4, choices=WIDTHS)
    key_axis: Literal["token", "channel"] = "token"
    value_axis: Literal["token", "channel"] = "token"
    key_group_size: int = param(0, ge=0)
    value_group_size: int = param(0, ge=0)

    def widths(self, state: dict[str, Any]) -> tuple[int, int]:
        return self.key_bits, self.value_bits

    def encode(self, keys: torch.Tensor, values: torch.Tensor, key_bits: int, value_bits: int,
               state: dict[str, Any]) -> tuple[Stored, Stored]:
        return (quantize(keys, key_bits, self.key_axis, self.key_group_size),
                quantize(values, value_bits, self.value_axis, self.value_group_size))

"""``quantizer=kvquant_stream``: streaming KVQuant — pre-RoPE per-channel keys, per-token/group values,
EMA-absmax statistics updated chunk by chunk (no offline calibration), attention sinks and outlier
channels at a higher width.

Statistics per layer (``state``): ``a_k``, ``a_v`` ``[B, H, 1, D]`` = running EMA of per-channel absmax::

    a <- m_c                                   (first chunk; m_c = max_t |x[..., t, :]| of chunk c)
    a <- ema_decay * a + (1 - ema_decay) * m_c (later chunks and decode flush groups)

Outlier channels: ``(h, d)`` with ``a[h, d] > outlier_threshold_relative * median(a)`` (or above
``outlier_threshold_abs`` when set) are stored apart at ``*_bits_sink_outlier`` bits (``ChannelSplit``).
Keys ``[B, H, T, D]``: per-channel INT-``key_bits_normal`` (KVQuant's per-channel keys) whose grid is set
by ``range``: ``chunk`` = each chunk's own per-channel min/max (asymmetric); ``ema`` = the EMA absmax,
``[-a_k, +a_k]`` per channel (symmetric; the statistic after this chunk's update; elements beyond it are
clipped to it), so the scales are the streaming statistics the seed describes, not the chunk's extremes.
Values: per-token with ``value_quant_groups`` groups over the channels (0 =
per-channel like keys). Tokens at positions < ``attention_sink_size`` are stored at the sink widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from kvcomp.cache.quant import half_safe, quantize
from kvcomp.cache.split import ChannelSplit, columns, rest_columns
from kvcomp.cache.storage import Dense, Stored
from kvcomp.fields import param
from kvcomp.quantizer.base import WIDTHS, Quantizer
from kvcomp.registry import QUANTIZERS


def ema_update(state: dict[str, Any], key: str, m: torch.Tensor, decay: float) -> torch.Tensor:
    """EMA of a statistic ``m`` in ``state[key]`` (initialised with the first value); returns it."""
    prev = state.get(key)
    state[key] = m.float() if prev is None else decay * prev + (1.0 - decay) * m.float()
    return state[key]


@QUANTIZERS.register("kvquant_stream")
@dataclass
class KVQuantStream(Quantizer):
    """Streaming KVQuant with the method's defaults (INT4, 4 sinks at 8 bit, outlier channels at 8 bit)."""

    ema_decay: float = param(0.9, ge=0, lt=1)
    attention_sink_size: int = param(4, ge=0)
    key_bits_normal: int = param(4, choices=WIDTHS)
    value_bits_normal: int = param(4, choices=WIDTHS)
    key_bits_sink_outlier: int = param(8, choices=WIDTHS)
    value_bits_sink_outlier: int = param(8, choices=WIDTHS)
    outlier_detection_enabled: bool = True
    outlier_threshold_relative: float = param(3.0, gt=0)
    outlier_threshold_abs: float | None = param(None, gt=0)
    value_quant_groups: int = param(1, ge=0)
    range: Literal["chunk", "ema"] = "chunk"

    def observe(self, keys: torch.Tensor, values: torch.Tensor, state: dict[str, Any]) -> None:
        ema_update(state, "a_k", keys.abs().amax(dim=-2, keepdim=True), self.ema_decay)
        ema_update(state, "a_v", values.abs().amax(dim=-2, keepdim=True), self.ema_decay)

    def widths(self, state: dict[str, Any]) -> tuple[int, int]:
        return self.key_bits_normal, self.value_bits_normal

    def sink_bits(self) -> tuple[int, int, int]:
        return self.attention_sink_size, self.key_bits_sink_outlier, self.value_bits_sink_outlier

    def outlier_columns(self, a: torch.Tensor) -> torch.Tensor | None:
        """Flat ``h * D + d`` indices (int32) of outlier channels from EMA absmax ``a`` [B, H, 1, D]."""
        if not self.outlier_detection_enabled:
            return None
        a = a.amax(dim=0).reshape(-1)  # [H * D], shared by the batch
        if self.outlier_threshold_abs is not None:
            mask = a > float(self.outlier_threshold_abs)
        else:
            mask = a > float(self.outlier_threshold_relative) * a.median()
        cols = mask.nonzero().squeeze(1).to(torch.int32)
        return cols if 0 < cols.numel() < a.numel() else None

    def _one(self, x: torch.Tensor, bits: int, high: int, axis: str, group: int, a: torch.Tensor,
             ema: bool = False) -> Stored:
        cols = self.outlier_columns(a) if high > bits else None
        if cols is None:
            return quantize(x, bits, axis, group, *_ema_range(a, x.shape, None) if ema else (None, None))
        rest, special = columns(x, cols)
        if axis == "token" and group:
            n_groups = x.shape[1] * max(1, x.shape[-1] // group)  # keep the number of groups per token
            group = -(-rest.shape[-1] // n_groups)
        normal = quantize(rest, bits, axis, group, *_ema_range(a, x.shape, cols) if ema else (None, None))
        hi = quantize(special, high, "channel", 0) if high < 16 else Dense(half_safe(special))
        return ChannelSplit(normal, hi, cols, tuple(x.shape))  # type: ignore[arg-type]

    def encode(self, keys: torch.Tensor, values: torch.Tensor, key_bits: int, value_bits: int,
               state: dict[str, Any]) -> tuple[Stored, Stored]:
        d = values.shape[-1]
        v_axis = "channel" if self.value_quant_groups == 0 else "token"
        v_group = 0 if self.value_quant_groups == 0 else max(1, d // self.value_quant_groups)
        k = self._one(keys, key_bits, self.key_bits_sink_outlier, "channel", 0, state["a_k"], self.range == "ema")
        v = self._one(values, value_bits, self.value_bits_sink_outlier, v_axis, v_group, state["a_v"])
        return k, v



def _ema_range(a: torch.Tensor, shape: tuple[int, ...], cols: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) = (-a, +a) per channel in ``quantize``'s grouped view of a per-channel block: ``[B, H, D, 1, 1]``
    for a whole ``[B, H, T, D]`` block, ``[B, 1, n, 1, 1]`` for the non-outlier columns (all heads flattened)."""
    b, h, _, d = shape
    a = a.float().expand(b, h, 1, d)
    if cols is None:
        hi = a.transpose(-1, -2).unsqueeze(-1)
    else:
        flat = a.transpose(1, 2).reshape(b, h * d)
        hi = flat.index_select(-1, rest_columns(h * d, cols.long()))[:, None, :, None, None]
    return -hi, hi

"""``quantizer=livekvquant``: LiveKVQuant-P — chunk-wise INT4 with a clipped EMA and sparse fp16 outliers.

Per layer and per channel, a running statistic ``r`` [B, H, 1, D] (separately for K and V) tracks the
absmax of each chunk, *clipped* against the EMA before it updates it, so one extreme chunk cannot blow
up the range::

    m_c = max_t |x[..., t, :]|                    (chunk c's per-channel absmax)
    r <- m_c                                      (first chunk)
    r <- ema_decay * r + (1 - ema_decay) * min(m_c, clip_factor * r)

Dense-and-sparse storage of a chunk (after ``warmup_chunks``): elements with ``|x| > outlier_scale * r``
go to a sparse fp16 list with int32 flat indices; the rest (clamped to the range) is INT-``bits``:
keys per channel over the chunk (pre-RoPE), values per token in groups of ``value_group_size`` channels.
The first ``warmup_chunks`` chunks of each layer only build statistics and are stored in fp16.
No token is ever dropped by this quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.cache.quant import Sparse, quantize, split_outliers
from kvcomp.cache.storage import Stored
from kvcomp.fields import param
from kvcomp.quantizer.base import PACK_BITS, Quantizer
from kvcomp.registry import QUANTIZERS


def clipped_ema(state: dict[str, Any], key: str, m: torch.Tensor, decay: float, clip: float) -> torch.Tensor:
    """Update ``state[key]`` with chunk statistic ``m`` clipped at ``clip`` times the running value."""
    m = m.float()
    prev = state.get(key)
    state[key] = m if prev is None else decay * prev + (1.0 - decay) * torch.minimum(m, clip * prev)
    return state[key]


@QUANTIZERS.register("livekvquant")
@dataclass
class LiveKVQuant(Quantizer):
    """INT-``bits`` chunks, clipped-EMA ranges, sparse fp16 outliers, fp16 warm-up chunks."""

    bits: int = param(4, choices=PACK_BITS)
    ema_decay: float = param(0.9, ge=0, lt=1)
    clip_factor: float = param(2.0, ge=1)
    outlier_scale: float = param(1.0, gt=0)
    warmup_chunks: int = param(2, ge=0)
    value_group_size: int = param(0, ge=0)

    def init_state(self) -> dict[str, Any]:
        return {"chunks": 0}

    def observe(self, keys: torch.Tensor, values: torch.Tensor, state: dict[str, Any]) -> None:
        state["chunks"] += 1
        clipped_ema(state, "r_k", keys.abs().amax(dim=-2, keepdim=True), self.ema_decay, self.clip_factor)
        clipped_ema(state, "r_v", values.abs().amax(dim=-2, keepdim=True), self.ema_decay, self.clip_factor)

    def widths(self, state: dict[str, Any]) -> tuple[int, int]:
        if state["chunks"] <= self.warmup_chunks:  # warm-up: statistics only, stored in fp16
            return 16, 16
        return self.bits, self.bits

    def encode(self, keys: torch.Tensor, values: torch.Tensor, key_bits: int, value_bits: int,
               state: dict[str, Any]) -> tuple[Stored, Stored]:
        return (self._one(keys, key_bits, "channel", 0, state["r_k"]),
                self._one(values, value_bits, "token", self.value_group_size, state["r_v"]))

    def _one(self, x: torch.Tensor, bits: int, axis: str, group: int, r: torch.Tensor) -> Stored:
        dense, index, vals = split_outliers(x.float(), self.outlier_scale * r)
        base = quantize(dense, bits, axis, group)
        return Sparse(base, index, vals) if index.numel() else base

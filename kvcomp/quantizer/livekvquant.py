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
from kvcomp.errors import ConfigError
from kvcomp.quantizer.base import Quantizer, check_bits
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

    bits: int = 4
    ema_decay: float = 0.9
    clip_factor: float = 2.0
    outlier_scale: float = 1.0
    warmup_chunks: int = 2
    value_group_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits("quantizer.bits", self.bits)
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise ConfigError(f"quantizer.ema_decay={self.ema_decay} must be in [0, 1)")
        if float(self.clip_factor) < 1.0:
            raise ConfigError(f"quantizer.clip_factor={self.clip_factor} must be >= 1")
        if float(self.outlier_scale) <= 0.0:
            raise ConfigError(f"quantizer.outlier_scale={self.outlier_scale} must be > 0")
        if not isinstance(self.warmup_chunks, int) or self.warmup_chunks < 0:
            raise ConfigError(f"quantizer.warmup_chunks={self.warmup_chunks} must be an integer >= 0")
        if not isinstance(self.value_group_size, int) or self.value_group_size < 0:
            raise ConfigError(f"quantizer.value_group_size={self.value_group_size} must be an integer >= 0")

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

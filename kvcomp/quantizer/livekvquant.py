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
``range`` picks the INT grid of that rest:

- ``chunk``: each group's own min/max of the clamped chunk (the EMA is only the outlier cut-off);
- ``ema``: the seed's streaming range: ``[-outlier_scale * r, +outlier_scale * r]`` per channel for keys
  (the clipped EMA *is* the INT range; a group's grid never depends on the chunk's extremes), values per
  token keep their own min/max inside the cut-off (a per-token group has no channel statistic).

The first ``warmup_chunks`` prefill chunks of each layer build statistics and are stored in fp16; decode
flush groups update the statistics but are never warm-up (neither stored in fp16 nor counted as a chunk).
``requantize_warmup``: once warm-up ends (the first chunk after it), the fp16 warm-up blocks are
re-encoded at ``bits`` with the settled statistics, so the cache holds no fp16 tokens in the end (tokens a
precision policy asked to keep at 16 bits during warm-up are re-encoded too). No token is ever dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from kvcomp.cache.quant import Sparse, quantize, split_outliers
from kvcomp.cache.storage import Dense, Segment, Stored
from kvcomp.fields import param
from kvcomp.quantizer.base import PACK_BITS, Blocks, Quantizer
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
    range: Literal["chunk", "ema"] = "chunk"
    requantize_warmup: bool = False

    def init_state(self) -> dict[str, Any]:
        return {"chunks": 0}

    def compress(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, state: dict[str, Any],
                 token_bits: torch.Tensor | None = None, decode: bool = False) -> list[Segment]:
        warm = not decode and state["chunks"] < self.warmup_chunks
        state["chunks"] += 0 if decode else 1
        state["warm"] = warm
        segments = super().compress(keys, values, positions, state, token_bits, decode)
        if warm and self.requantize_warmup:  # mark the fp16 warm-up blocks for re-encoding
            segments = [Segment(WarmupBlock(s.keys.data), WarmupBlock(s.values.data), s.index)
                        if isinstance(s.keys, Dense) and isinstance(s.values, Dense) else s for s in segments]
        elif not warm and self.requantize_warmup and not state.get("requantized"):
            state["requantized"] = True
            state["requantize_now"] = True
        return segments

    def requantize(self, blocks: Blocks, state: dict[str, Any]) -> dict[int, tuple[Stored, Stored]]:
        if not state.pop("requantize_now", False):
            return {}
        return {i: self.encode(k.data, v.data, self.bits, self.bits, state)
                for i, (k, v) in enumerate(blocks) if isinstance(k, WarmupBlock) and isinstance(v, WarmupBlock)}

    def observe(self, keys: torch.Tensor, values: torch.Tensor, state: dict[str, Any]) -> None:
        clipped_ema(state, "r_k", keys.abs().amax(dim=-2, keepdim=True), self.ema_decay, self.clip_factor)
        clipped_ema(state, "r_v", values.abs().amax(dim=-2, keepdim=True), self.ema_decay, self.clip_factor)

    def widths(self, state: dict[str, Any]) -> tuple[int, int]:
        if state.get("warm"):  # warm-up: statistics only, stored in fp16
            return 16, 16
        return self.bits, self.bits

    def encode(self, keys: torch.Tensor, values: torch.Tensor, key_bits: int, value_bits: int,
               state: dict[str, Any]) -> tuple[Stored, Stored]:
        return (self._one(keys, key_bits, "channel", 0, state["r_k"], self.range == "ema"),
                self._one(values, value_bits, "token", self.value_group_size, state["r_v"], False))

    def _one(self, x: torch.Tensor, bits: int, axis: str, group: int, r: torch.Tensor, ema: bool) -> Stored:
        limit = self.outlier_scale * r
        dense, index, vals = split_outliers(x.float(), limit)
        if ema:  # per-channel grid [-limit, limit]; grouped view of a [B, H, T, D] block by channel: [B, H, D, 1, 1]
            lim = limit.expand(x.shape[0], x.shape[1], 1, x.shape[-1]).transpose(-1, -2).unsqueeze(-1)
            base = quantize(dense, bits, axis, group, lo=-lim, hi=lim)
        else:
            base = quantize(dense, bits, axis, group)
        return Sparse(base, index, vals) if index.numel() else base


class WarmupBlock(Dense):
    """An fp16 warm-up block that ``requantize_warmup`` re-encodes once the statistics are settled."""

    def arena_key(self) -> tuple | None:
        """Kept apart (a page of the arena): ``requantize`` finds and replaces it whole."""
        return None

"""Dynamic precision: importance scores -> bits per token (or drop), when a chunk is stored.

``mode=tiers``: scores of the chunk are normalised to [0, 1] (``normalize=minmax`` or ``rank``, the
percentile), then ``s >= theta_h`` -> ``bits[0]`` (8), ``theta_m <= s < theta_h`` -> ``bits[1]`` (4),
``s < theta_m`` -> ``bits[2]`` (2) or dropped when ``drop_low``. ``mode=budget``: keep the top
``keep_ratio`` of each chunk (or ``keep_tokens`` of the prompt, as a ratio of the prompt length) at the
quantizer's own width, drop the rest. ``mode=none``: every token at the quantizer's width.
The first ``protect_sinks`` positions are never dropped and always get the highest width; tokens
without a score (decode) get the quantizer's width. Widths: 2/3/4/8 packed, 16 = fp16, -1 = quantizer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvcomp.errors import ConfigError
from kvcomp.fields import param

DEFAULT = -1  # "the quantizer's own width"


@dataclass
class Precision:
    """Maps a layer's scores [T] and positions [T] to token widths [T] (0 = drop)."""

    mode: Literal["none", "tiers", "budget"] = "none"
    theta_h: float = param(0.7, ge=0, le=1)
    theta_m: float = param(0.3, ge=0, le=1)
    bits: list[int] = param(default_factory=lambda: [8, 4, 2], choices=(2, 3, 4, 8, 16), min_len=3, max_len=3)
    drop_low: bool = False
    normalize: Literal["minmax", "rank"] = "minmax"
    keep_ratio: float | None = param(0.5, gt=0, le=1)
    keep_tokens: int | None = param(None, gt=0)
    protect_sinks: int = param(4, ge=0)

    def __post_init__(self) -> None:
        if not self.theta_m < self.theta_h:
            raise ConfigError(f"compressor.precision: need theta_m < theta_h, got theta_m={self.theta_m}"
                              f" theta_h={self.theta_h}")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def may_drop(self) -> bool:
        return self.mode == "budget" or (self.mode == "tiers" and self.drop_low)

    def __call__(self, scores: torch.Tensor, positions: torch.Tensor, prompt_len: int = 0) -> torch.Tensor | None:
        if self.mode == "none":
            return None
        bits = torch.full(scores.shape, DEFAULT, dtype=torch.int64, device=scores.device)
        scored = ~torch.isnan(scores)
        if not bool(scored.any()):
            return None
        s = scores[scored]
        if self.mode == "tiers":
            u = self._normalise(s)
            low = 0 if self.drop_low else self.bits[2]
            tier = torch.where(u >= self.theta_h, self.bits[0], torch.where(u >= self.theta_m, self.bits[1], low))
        else:
            ratio = float(self.keep_ratio or 1.0)
            if self.keep_tokens is not None and prompt_len:
                ratio = min(1.0, self.keep_tokens / prompt_len)
            k = max(1, round(ratio * s.numel()))
            tier = torch.zeros_like(s, dtype=torch.int64)
            tier[torch.topk(s, k).indices] = DEFAULT
        bits[scored] = tier.to(torch.int64)
        sink = positions.to(bits.device) < self.protect_sinks
        top = DEFAULT if self.mode == "budget" else self.bits[0]
        return torch.where(sink, torch.full_like(bits, top), bits)

    def _normalise(self, s: torch.Tensor) -> torch.Tensor:
        if self.normalize == "rank":
            return torch.argsort(torch.argsort(s)).float() / max(1, s.numel() - 1)
        lo, hi = s.min(), s.max()
        return (s - lo) / (hi - lo) if hi > lo else torch.ones_like(s)

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

from dataclasses import dataclass, field

import torch

from kvcomp.errors import ConfigError

DEFAULT = -1  # "the quantizer's own width"
MODES = ("none", "tiers", "budget")


@dataclass
class Precision:
    """Maps a layer's scores [T] and positions [T] to token widths [T] (0 = drop)."""

    mode: str = "none"
    theta_h: float = 0.7
    theta_m: float = 0.3
    bits: list[int] = field(default_factory=lambda: [8, 4, 2])
    drop_low: bool = False
    normalize: str = "minmax"
    keep_ratio: float | None = 0.5
    keep_tokens: int | None = None
    protect_sinks: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"compressor.precision.mode={self.mode} is not a mode; allowed: {', '.join(MODES)}")
        if not 0.0 <= self.theta_m < self.theta_h <= 1.0:
            raise ConfigError(f"compressor.precision: need 0 <= theta_m < theta_h <= 1, got theta_m={self.theta_m}"
                              f" theta_h={self.theta_h}")
        if len(self.bits) != 3 or any(b not in (2, 3, 4, 8, 16) for b in self.bits):
            raise ConfigError(f"compressor.precision.bits={list(self.bits)} must be 3 widths from 2, 3, 4, 8, 16")
        if self.normalize not in ("minmax", "rank"):
            raise ConfigError(f"compressor.precision.normalize={self.normalize}; allowed: minmax, rank")
        if self.keep_ratio is not None and not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ConfigError(f"compressor.precision.keep_ratio={self.keep_ratio} must be in (0, 1]")
        if self.keep_tokens is not None and (not isinstance(self.keep_tokens, int) or self.keep_tokens <= 0):
            raise ConfigError(f"compressor.precision.keep_tokens={self.keep_tokens} must be an integer > 0")

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

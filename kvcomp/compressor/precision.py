"""Dynamic precision: importance scores -> bits per token (or drop), when a chunk is stored.

``mode=tiers``: scores are mapped to u in [0, 1], then ``u >= theta_h`` -> ``bits[0]`` (8),
``theta_m <= u < theta_h`` -> ``bits[1]`` (4), ``u < theta_m`` -> ``bits[2]`` (2) or dropped when
``drop_low``. ``normalize`` says what u is:

- ``global`` (default): u = the score's quantile among every score seen so far in the prompt in its layer
  band (``bands`` equal bands of consecutive layers; 1 = all layers pooled), this chunk included. The
  thresholds are running quantiles, so over the prompt about ``1 - theta_h`` of the tokens get 8 bits,
  but a chunk's share follows its content: a filler chunk whose scores sit below the running
  ``theta_m`` quantile is all 2-bit (or dropped), a needle chunk keeps its needle at 8 bits. With pooled
  layers the layer weight w_l of a scorer acts across layers (a down-weighted layer gets fewer 8-bit
  tokens); per-layer bands (``bands`` = L) cancel it. The first chunk has no history: it is ranked
  against itself. Memory: the band's sorted scores, at most ``history`` (65536) floats per band.
- ``minmax`` / ``rank`` (ablations): each chunk's and layer's scores alone, min-max rescaled or ranked;
  every chunk then gets some 8-bit and some 2-bit tokens whatever it holds, and w_l cancels out.
 ``mode=budget``: keep the top
``keep_ratio`` of each chunk (or ``keep_tokens`` of the prompt, as a ratio of the prompt length) at the
quantizer's own width, drop the rest. ``mode=none``: every token at the quantizer's width.
``budget_at`` (``mode=budget``): ``stream`` = each chunk's drops are decided when it is stored;
``end`` = nothing is dropped while the prompt streams, then at its end each layer keeps the top
``keep_ratio`` of the tokens it holds by the scorer's score with the prompt end's queries (the last forward's
trailing queries, which are always kept), as SnapKV and FastKV compress once the prompt is known; the
cache holds every token at the quantizer's width until then. ``keep_of`` (``budget_at: end``): ``held`` = each
layer keeps ``keep_ratio`` of what it holds (``keep_tokens`` as a ratio of the prompt length); ``prompt`` = each
layer keeps ``round(keep_ratio * prompt length)`` tokens (or ``keep_tokens``), at most what it holds: one
capacity for every layer, FastKV's (its ``retain_rate``; past its TSP layer, ``retain_rate / tsp_rate`` of the
carried tokens is the same count).
``hold_bits`` (``compressor.question: end`` only): before the question is known no token is stored below
this width and none is dropped; the question-aware pass at the prompt's end demotes them to their tiers.
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


class RunningScores:
    """One prompt's scores so far, per layer band: a sorted 1-D tensor each (thinned by 2 past ``cap``)."""

    def __init__(self, cap: int = 65536) -> None:
        self.cap = cap
        self.sorted: dict[int, torch.Tensor] = {}

    def quantile(self, band: int, s: torch.Tensor) -> torch.Tensor:
        """Add ``s`` [T] to ``band``, then return each score's quantile in it, [T] in [0, 1]: its rank over
        (size - 1), ties sharing their mean rank (a lone chunk gets ``normalize=rank``'s values)."""
        self.add(band, s)
        return self.rank(band, s)

    def add(self, band: int, s: torch.Tensor) -> None:
        prev = self.sorted.get(band)
        new = torch.sort(s.float()).values
        if prev is None:
            ref = new
        else:  # merge two sorted runs (the same tensor a sort of both gives, without re-sorting the history)
            new = new.to(prev.device)
            at = torch.searchsorted(prev, new, right=True) + torch.arange(new.numel(), device=prev.device)
            ref = torch.empty(prev.numel() + new.numel(), device=prev.device)
            keep = torch.ones(ref.numel(), dtype=torch.bool, device=prev.device)
            keep[at] = False
            ref[at] = new
            ref[keep] = prev
        if ref.numel() > self.cap:
            ref = ref[ref.numel() % 2 :: 2]
        self.sorted[band] = ref.contiguous()

    def rank(self, band: int, s: torch.Tensor) -> torch.Tensor:
        """Quantiles [T] of ``s`` in ``band`` as it stands."""
        ref = self.sorted[band]
        lo = torch.searchsorted(ref, s.float().contiguous(), right=False)
        hi = torch.searchsorted(ref, s.float().contiguous(), right=True)
        if ref.numel() < 2:
            return torch.ones_like(s, dtype=torch.float32)
        return ((lo + hi - 1).float() / (2 * (ref.numel() - 1))).clamp(0, 1)


@dataclass
class Precision:
    """Maps a layer's scores [T] and positions [T] to token widths [T] (0 = drop)."""

    mode: Literal["none", "tiers", "budget"] = "none"
    theta_h: float = param(0.7, ge=0, le=1)
    theta_m: float = param(0.3, ge=0, le=1)
    bits: list[int] = param(default_factory=lambda: [8, 4, 2], choices=(2, 3, 4, 8, 16), min_len=3, max_len=3)
    drop_low: bool = False
    normalize: Literal["global", "minmax", "rank"] = "global"
    bands: int = param(1, ge=1)
    history: int = param(65536, ge=2)
    keep_ratio: float | None = param(0.5, gt=0, le=1)
    keep_tokens: int | None = param(None, gt=0)
    protect_sinks: int = param(4, ge=0)
    hold_bits: int = param(4, choices=(2, 3, 4, 8, 16))
    budget_at: Literal["stream", "end"] = "stream"
    keep_of: Literal["held", "prompt"] = "held"

    def __post_init__(self) -> None:
        if not self.theta_m < self.theta_h:
            raise ConfigError(f"compressor.precision: need theta_m < theta_h, got theta_m={self.theta_m}"
                              f" theta_h={self.theta_h}")
        if self.keep_of == "prompt" and self.budget_at != "end":
            raise ConfigError("compressor.precision.keep_of=prompt needs compressor.precision.budget_at=end "
                              f"(got budget_at={self.budget_at}); allowed with budget_at=stream: held")

    def end_keep(self, held: int, prompt_len: int) -> int:
        """``budget_at: end``: how many of the ``held`` tokens a layer keeps (see ``keep_of``)."""
        if self.keep_of == "prompt" and prompt_len:
            cap = self.keep_tokens if self.keep_tokens is not None else round(float(self.keep_ratio or 1.0)
                                                                                * prompt_len)
            return max(1, min(held, cap))
        ratio = float(self.keep_ratio or 1.0)
        if self.keep_tokens is not None and prompt_len:
            ratio = min(1.0, self.keep_tokens / prompt_len)
        return max(1, round(ratio * held))

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def may_drop(self) -> bool:
        return self.mode == "budget" or (self.mode == "tiers" and self.drop_low)

    def for_prompt(self) -> PromptPolicy:
        """This policy with fresh running statistics, for one prompt's cache."""
        return PromptPolicy(self)

    def band(self, layer_idx: int, n_layers: int) -> int:
        """Layer band of ``layer_idx``: ``bands`` equal runs of consecutive layers."""
        return min(self.bands - 1, layer_idx * self.bands // max(1, n_layers))

    def __call__(self, scores: torch.Tensor, positions: torch.Tensor, prompt_len: int = 0, layer_idx: int = 0,
                 n_layers: int = 1, stats: RunningScores | None = None, drop: bool | None = None
                 ) -> torch.Tensor | None:
        """Widths [T] for scores [T] (NaN = unscored) of tokens at ``positions`` [T] of layer ``layer_idx``;
        ``stats``: the prompt's running scores (``normalize=global``; without it the chunk is its own history);
        ``drop``: override ``drop_low`` (false while a later pass decides the drops)."""
        if self.mode == "none":
            return None
        bits = torch.full(scores.shape, DEFAULT, dtype=torch.int64, device=scores.device)
        scored = ~torch.isnan(scores)
        if not bool(scored.any()):
            return None
        s = scores[scored]
        if self.mode == "tiers":
            if self.normalize == "global":
                u = (stats or RunningScores(self.history)).quantile(self.band(layer_idx, n_layers), s)
            else:
                u = self._normalise(s)
            tier = self._tiers(u, drop)
        else:
            ratio = float(self.keep_ratio or 1.0)
            if self.keep_tokens is not None and prompt_len:
                ratio = min(1.0, self.keep_tokens / prompt_len)
            k = max(1, round(ratio * s.numel()))
            tier = torch.zeros_like(s, dtype=torch.int64)
            tier[torch.topk(s, k).indices] = DEFAULT
        bits[scored] = tier.to(torch.int64)
        return self._sinks(bits, positions)

    def tier(self, u: torch.Tensor, positions: torch.Tensor, drop: bool | None = None) -> torch.Tensor:
        """Widths [T] of tokens whose normalised scores are ``u`` [T] (``drop``: override ``drop_low``)."""
        return self._sinks(self._tiers(u, drop), positions)

    def _tiers(self, u: torch.Tensor, drop: bool | None) -> torch.Tensor:
        low = 0 if (self.drop_low if drop is None else drop) else self.bits[2]
        t = torch.where(u >= self.theta_h, self.bits[0], torch.where(u >= self.theta_m, self.bits[1], low))
        return t.to(torch.int64)

    def _sinks(self, bits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        sink = positions.to(bits.device) < self.protect_sinks
        top = DEFAULT if self.mode == "budget" else self.bits[0]
        return torch.where(sink, torch.full_like(bits, top), bits)

    def _normalise(self, s: torch.Tensor) -> torch.Tensor:
        if self.normalize == "rank":
            return torch.argsort(torch.argsort(s)).float() / max(1, s.numel() - 1)
        lo, hi = s.min(), s.max()
        return (s - lo) / (hi - lo) if hi > lo else torch.ones_like(s)


class PromptPolicy:
    """A ``Precision`` bound to one prompt's running statistics (what the cache calls for each flushed run)."""

    def __init__(self, precision: Precision) -> None:
        self.precision = precision
        self.stats = RunningScores(precision.history)
        self.defer_drops = False  # question: end -- a pass at the prompt's end decides the drops

    def scores_unused(self) -> bool:
        """Whether no streamed token's width depends on its score: the end pass decides (``defer_drops``) and
        either ``mode: budget`` (every token kept until then) or every tier is at or below ``hold_bits`` (each
        scored token is held at ``hold_bits``). The end pass scores with fresh statistics, so none are kept."""
        p = self.precision
        return self.defer_drops and (p.mode == "budget" or (p.mode == "tiers" and max(p.bits) <= p.hold_bits))

    def __call__(self, scores: torch.Tensor, positions: torch.Tensor, prompt_len: int = 0, layer_idx: int = 0,
                 n_layers: int = 1) -> torch.Tensor | None:
        if self.scores_unused() and self.precision.mode == "tiers":  # the widths the tiers would give, directly
            scored = ~torch.isnan(scores)
            if not bool(scored.any()):
                return None
            return torch.where(scored, self.precision.hold_bits, DEFAULT).to(torch.int64)
        if not self.defer_drops:
            return self.precision(scores, positions, prompt_len, layer_idx, n_layers, self.stats)
        if self.precision.mode == "budget":  # budget_at: end -- every token kept until the end pass
            return None
        bits = self.precision(scores, positions, prompt_len, layer_idx, n_layers, self.stats, drop=False)
        if bits is None or self.precision.mode != "tiers":
            return bits
        hold = self.precision.hold_bits  # before the question: no token below this width (demoted at the end)
        return torch.where(bits > 0, bits.clamp(min=hold), bits)

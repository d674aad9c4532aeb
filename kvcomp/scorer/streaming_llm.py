"""``scorer=streaming_llm``: StreamingLLM (Xiao et al., 2024) — attention sinks + a recent window.

Score 2 for the first ``sink_tokens`` positions (attention sinks), 1 for the last ``window`` tokens of the
forward being stored (the recent window when the chunk is the end of the prompt), and a small recency
ramp (position / seen) for the rest, so a budget keeps sinks, then the most recent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomp.fields import param
from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext, Scorer


@SCORERS.register("streaming_llm")
@dataclass
class StreamingLLM(Scorer):
    """``sink_tokens`` (4) sinks and a ``window`` (256) of recent tokens."""

    sink_tokens: int = param(4, ge=0)
    window: int = param(256, ge=0)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        p = ctx.positions[: ctx.n_store].float()
        end = p[-1] + 1
        s = 0.5 * p / end
        s = torch.where(p >= end - self.window, torch.ones_like(s), s)
        return torch.where(p < self.sink_tokens, torch.full_like(s, 2.0), s)

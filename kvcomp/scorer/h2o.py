"""``scorer=h2o``: Heavy-Hitter Oracle (Zhang et al., 2023) — accumulated attention.

Each stored token's score is the attention it receives summed over *all* queries of its forward (its own
chunk, causal) and averaged over heads: the heavy hitters. Computed in query blocks to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext, Scorer


@SCORERS.register("h2o")
@dataclass
class H2O(Scorer):
    """Accumulated attention from every query of the chunk."""

    query_window: int = -1
    needs_question: bool = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        a = ctx.attention()[..., : ctx.n_store]
        return a.sum(dim=2).mean(dim=(0, 1))

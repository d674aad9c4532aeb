"""``scorer=h2o``: Heavy-Hitter Oracle (Zhang et al., 2023) — accumulated attention.

Each stored token's score is the attention it receives from the queries of its forward (its own chunk,
causal; the last forward's trailing queries at the prompt end for ``budget_at: end``), averaged over heads:
the heavy hitters. ``normalize``: ``sum`` (H2O's accumulated attention) or ``mean`` = that sum divided by the
number of those queries that see the token (kvpress's ObservedAttention). Under a causal mask a sum
favours early tokens: the last token of a chunk is seen by one query, the first by all of them, so a
per-chunk budget on sums drops each chunk's tail, the prompt's end (the question) included
(``docs/h2o.md``). Computed in query blocks to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext, Scorer


@SCORERS.register("h2o")
@dataclass
class H2O(Scorer):
    """Attention from every query of the chunk, summed (``normalize: sum``) or averaged over those that see it."""

    query_window: int = -1
    needs_question: bool = False
    normalize: Literal["sum", "mean"] = "sum"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        a = ctx.attention()[..., : ctx.n_store]
        s = a.sum(dim=2).mean(dim=(0, 1))
        if self.normalize == "mean":  # queries are the forward's last W tokens: token j is seen by min(W, q - j)
            w, q = a.shape[2], ctx.new_keys.shape[2]
            seen = (q - torch.arange(ctx.n_store, device=s.device)).clamp(max=w)
            s = s / seen
        return s

"""``scorer=random``: a control — uniform random scores, deterministic in (seed, layer, position)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomp.fields import param
from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext, Scorer


@SCORERS.register("random")
@dataclass
class RandomScorer(Scorer):
    """Random importance (seeded)."""

    seed: int = param(0, ge=0)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx * 7919 + int(ctx.positions[0]))
        return torch.rand(ctx.n_store, generator=g).to(ctx.positions.device)

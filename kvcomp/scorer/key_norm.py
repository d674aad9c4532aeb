"""``scorer=key_norm``: Knorm (Devoto et al., 2024) — tokens with a *low* key L2 norm get high attention.

Score = -‖k_i‖₂ of the pre-RoPE key, averaged over KV heads (no queries needed, cheapest scorer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext, Scorer


@SCORERS.register("key_norm")
@dataclass
class KeyNorm(Scorer):
    """Negative key norm."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return -ctx.new_keys_pre[..., : ctx.n_store, :].float().norm(dim=-1).mean(dim=(0, 1))

"""``scorer=snapkv``: SnapKV (Li et al., 2024) — attention from an observation window, pooled.

The last ``window`` queries of each forward (the end of a prefill chunk; the question when it is
appended) attend over history + chunk; each stored token's score is that attention averaged over the
window's queries and heads, then max-pooled over ``kernel`` neighbouring tokens so that kept tokens come
in clusters. Chunk-wise, as kvcomp decides a token's fate when its chunk is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomp.fields import param
from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext, Scorer, pool1d, stored_attention


@SCORERS.register("snapkv")
@dataclass
class SnapKV(Scorer):
    """Observation window ``window`` (32), pooling ``kernel`` (7)."""

    window: int = param(32, gt=0)
    kernel: int = param(7, ge=1, where=lambda k: k % 2 == 1, what="odd")
    needs_question: bool = False

    def __post_init__(self) -> None:
        self.query_window = self.window

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return pool1d(stored_attention(ctx), self.kernel)

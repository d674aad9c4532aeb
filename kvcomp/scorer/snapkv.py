"""``scorer=snapkv``: SnapKV (Li et al., 2024) — attention from an observation window, pooled.

The last ``window`` queries of each forward (the end of a prefill chunk; the question when it is
appended) attend over history + chunk; each stored token's score is that attention averaged over the
window's queries and heads, then max-pooled over ``kernel`` neighbouring tokens so that kept tokens come
in clusters. Chunk-wise, as kvcomp decides a token's fate when its chunk is stored.

``heads`` says how the heads' attention becomes one score per token (kvcomp's cache keeps one token set
per layer, SnapKV and FastKV one per KV head): ``mean`` (default) averages over every query head; ``max``
averages each KV head's query group (FastKV's per-head score, up to a constant) and takes the largest over the
KV heads, so a token that one KV head attends to strongly is kept even when the others ignore it; ``rank``
takes, per token, its best rank quantile over the KV heads, so a budget of ``k`` tokens holds about the top
``k / H_kv`` of every KV head (the union of per-head selections at the layer's size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvcomp.fields import param
from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext, Scorer, pool1d, stored_attention


def kv_head_attention(ctx: ScoreContext) -> torch.Tensor:
    """Attention the window pays to each stored token per KV head, ``[H_kv, n_store]``: averaged over batch, the
    head's query group and the queries (FastKV sums over the group: the same ranking; the rows' mean is
    ``stored_attention``)."""
    a = ctx.attention()[..., : ctx.n_store]  # [B, Hq, W, n]
    b, hq, w, n = a.shape
    hkv = ctx.new_keys.shape[1]
    return a.reshape(b, hkv, hq // hkv, w, n).mean(dim=(0, 2, 3))


def rank_quantile(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` [H, n]: each entry's rank over (n - 1), 1 = the row's largest."""
    n = x.shape[-1]
    return torch.argsort(torch.argsort(x, dim=-1), dim=-1).float() / max(1, n - 1)


@SCORERS.register("snapkv")
@dataclass
class SnapKV(Scorer):
    """Observation window ``window`` (32), pooling ``kernel`` (7), head reduction ``heads`` (mean)."""

    window: int = param(32, gt=0)
    kernel: int = param(7, ge=1, where=lambda k: k % 2 == 1, what="odd")
    heads: Literal["mean", "max", "rank"] = "mean"
    needs_question: bool = False

    def __post_init__(self) -> None:
        self.query_window = self.window

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if self.heads == "mean":
            return pool1d(stored_attention(ctx), self.kernel)
        per_head = torch.stack([pool1d(h, self.kernel) for h in kv_head_attention(ctx)])  # [H_kv, n]
        if self.heads == "rank":
            per_head = rank_quantile(per_head)
        return per_head.max(dim=0).values

"""SnapKV's head reduction (``scorer.heads``): mean over query heads, or per KV head (max / best rank)."""

from __future__ import annotations

import pytest
import torch

from kvcomp.errors import ConfigError
from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext


def context(n: int = 40, w: int = 6, hq: int = 6, hkv: int = 2, d: int = 8) -> ScoreContext:
    """Random keys of ``n`` tokens, the last ``w`` of which are the queries' own tokens (causal)."""
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1, hkv, n, d, generator=g)
    queries = torch.randn(1, hq, w, d, generator=g) * 2
    logits = torch.matmul(queries, keys.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2)) * d**-0.5
    logits = logits.masked_fill(torch.ones(w, n, dtype=torch.bool).triu_(n - w + 1), float("-inf"))
    return ScoreContext(layer_idx=0, n_layers=2, new_keys=keys, new_keys_pre=keys, queries=queries,
                        lse=torch.logsumexp(logits, dim=-1), positions=torch.arange(n), n_store=n, scaling=d**-0.5)


def reference(ctx: ScoreContext, kernel: int) -> torch.Tensor:
    """Plain softmax per query head, the mean over each KV head's group and the window, pooled: [H_kv, n]."""
    hq, w, n = ctx.queries.shape[1], ctx.queries.shape[2], ctx.new_keys.shape[2]
    hkv = ctx.new_keys.shape[1]
    k = ctx.new_keys.repeat_interleave(hq // hkv, dim=1)
    logits = torch.matmul(ctx.queries, k.transpose(-1, -2)) * ctx.scaling
    logits = logits.masked_fill(torch.ones(w, n, dtype=torch.bool).triu_(n - w + 1), float("-inf"))
    a = torch.softmax(logits, dim=-1)[0]  # [Hq, W, n]
    per_kv = a.reshape(hkv, hq // hkv, w, n).mean(dim=(1, 2))
    return torch.nn.functional.max_pool1d(per_kv[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]


def test_heads_max_and_mean_equal_a_direct_softmax() -> None:
    ctx = context()
    ref = reference(ctx, 5)
    got_max = SCORERS.build({"name": "snapkv", "kernel": 5, "heads": "max"}).score(ctx)
    assert torch.allclose(got_max, ref.max(dim=0).values, atol=1e-6)
    mean = reference(context(), 1).mean(dim=0)  # mean over heads, then pooled (the default's order)
    pooled = torch.nn.functional.max_pool1d(mean[None, None], 5, stride=1, padding=2)[0, 0]
    assert torch.allclose(SCORERS.build({"name": "snapkv", "kernel": 5}).score(ctx), pooled, atol=1e-6)


def test_heads_rank_keeps_every_kv_heads_best_tokens() -> None:
    ctx = context(hkv=3, hq=6)
    ref = reference(ctx, 1)  # [3, n]
    s = SCORERS.build({"name": "snapkv", "kernel": 1, "heads": "rank"}).score(ctx)
    kept = set(torch.topk(s, 3 * 2).indices.tolist())
    for h in range(3):  # a budget of 2 per KV head holds each head's own top 2
        assert set(torch.topk(ref[h], 2).indices.tolist()) <= kept, h
    mean_top = set(torch.topk(ref.mean(dim=0), 6).indices.tolist())
    assert mean_top != kept  # the mean's top 6 differs here: one head's favourites lose to the others' sum


def test_heads_is_validated() -> None:
    with pytest.raises(ConfigError, match="heads=all is not one of: mean, max, rank"):
        SCORERS.build({"name": "snapkv", "heads": "all"})

"""Selective propagation: the layer -> share map, and a share held over the prompt or per chunk."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvcomp.errors import ConfigError
from kvcomp.registry import COMPRESSORS, PROPAGATORS, QUANTIZERS
from kvcomp.scorer.base import ScoreContext, Scorer


def test_layer_share_map() -> None:
    lr = PROPAGATORS.build({"name": "layer_ratio"})
    assert [lr.ratio(i, 4) for i in range(4)] == [0.8, 0.8, 0.6, 0.4]
    assert lr.layer_shares(4) == [1.0, 0.8, 0.8, 0.6]  # the last layer's 0.4 never applies
    shares = lr.layer_shares(30)  # SmolLM2: bands 0-8 / 9-20 / 21-29, each taking effect one layer late
    assert shares == [1.0] + [0.8] * 9 + [0.6] * 12 + [0.4] * 8
    tsp = PROPAGATORS.build({"name": "fastkv_tsp", "tsp_rate": 0.2})
    assert tsp.layer_shares(30) == [1.0] * 15 + [0.2] * 15  # selection after layer 14 (L // 2 - 1)
    assert PROPAGATORS.build({"name": "none"}).layer_shares(3) == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="budget=layer is not one of: prompt, chunk"):
        PROPAGATORS.build({"name": "layer_ratio", "budget": "layer"})


@dataclass
class ChunkContent(Scorer):
    """Crafted scores: tokens 64-127 (the 'needle chunk') score 1, every other token ~0.1."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        p = ctx.positions[: ctx.n_store].float()
        noise = 0.01 * torch.sin(p * 12.9898).abs()  # distinct, deterministic
        return torch.where((p >= 64) & (p < 128), 1.0 + noise, 0.1 + noise)


def held_per_chunk(model, budget: str) -> list[list[int]]:
    prop = PROPAGATORS.build({"name": "layer_ratio", "early": 0.5, "middle": 0.5, "late": 0.5, "keep_last": 0,
                              "budget": budget, "schedule": "chunk"})
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": 64}, quantizer=QUANTIZERS.build({"name": "none"}),
                             propagator=prop, scorer=ChunkContent())
    ids = torch.randint(3, 250, (1, 256), generator=torch.Generator().manual_seed(11))
    with comp.session(model) as sess:
        sess.prefill(ids)
    cache = sess.cache
    out = []
    for layer in cache.layers:
        pos = torch.cat(layer.pos_blocks)
        out.append([int(((pos >= c) & (pos < c + 64)).sum()) for c in range(0, 256, 64)])
    return out


def test_prompt_budget_follows_content(tiny) -> None:
    model, _ = tiny
    chunk = held_per_chunk(model, "chunk")
    assert chunk[0] == [64] * 4 and all(row == [32] * 4 for row in chunk[1:])  # half of every chunk
    prompt = held_per_chunk(model, "prompt")
    assert prompt[0] == [64] * 4
    first, needle, after, last = prompt[1]
    assert first == 32  # the first chunk has no history: ranked against itself
    assert needle == 64  # the important chunk goes on whole
    assert after < 32 and last < 32  # filler after it: less than the per-chunk share (the median is filler)
    total = sum(prompt[1])
    assert 0.35 * 256 <= total <= 0.65 * 256  # about the share over the prompt
    assert prompt[2] == prompt[3] == prompt[1]  # ratio unchanged: no further selection

"""Global tiers: running quantiles across chunks and layers map importance to 8/4/2/drop."""

from __future__ import annotations

import pytest
import torch

from kvcomp.compressor.precision import Precision, RunningScores
from kvcomp.errors import ConfigError
from kvcomp.fields import bind
from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext


def uniform(n: int, seed: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=torch.Generator().manual_seed(seed))


def shares(bits: torch.Tensor) -> dict[int, float]:
    return {b: float((bits == b).float().mean()) for b in (8, 4, 2, 0)}


def stream(normalize: str, **kw) -> tuple[dict[int, float], dict[int, float], torch.Tensor]:
    """Eight ordinary chunks, then a filler chunk (low, flat scores) and a needle chunk (filler + 8 high)."""
    p = Precision(mode="tiers", normalize=normalize, protect_sinks=0, **kw)
    policy = p.for_prompt()
    pos = torch.arange(1000, 1064)
    for c in range(8):
        policy(uniform(64, c), pos)
    filler = policy(uniform(64, 10, 0.02, 0.1), pos)
    needle_scores = uniform(64, 11, 0.02, 0.1)
    needle_scores[20:28] = 0.95
    needle = policy(needle_scores, pos)
    return shares(filler), shares(needle), needle


def test_global_tiers_follow_content_across_chunks() -> None:
    filler, needle, bits = stream("global")
    assert filler[8] == 0 and filler[4] == 0 and filler[2] == 1  # all below the running theta_m quantile
    assert bits[20:28].tolist() == [8] * 8 and needle[8] == 8 / 64  # only the needle gets 8 bits
    for per_chunk in ("minmax", "rank"):  # ablations: every chunk gets its 8-bit share whatever it holds
        f, n, b = stream(per_chunk)
        assert f[8] >= 0.2 and f[2] <= 0.5
        assert b[20:28].tolist() == [8] * 8 and n[8] >= 8 / 64


def test_global_tiers_drop_a_filler_chunk() -> None:
    filler, needle, bits = stream("global", drop_low=True)
    assert filler[0] == 1 and needle[0] == 56 / 64 and bits[20:28].tolist() == [8] * 8
    f, _, _ = stream("minmax", drop_low=True)
    assert f[0] < 0.6  # per-chunk normalisation keeps most of a filler chunk


def test_pooled_layers_let_the_layer_weight_act() -> None:
    pos = torch.arange(100, 164)
    out = {}
    for bands in (1, 2):
        policy = Precision(mode="tiers", bands=bands, protect_sinks=0).for_prompt()
        for c in range(3):  # layer 1's scores are layer 0's scaled by 0.25 (a layer weight)
            s = uniform(64, c)
            b0, b1 = policy(s, pos, layer_idx=0, n_layers=2), policy(0.25 * s, pos, layer_idx=1, n_layers=2)
        out[bands] = (shares(b0)[8], shares(b1)[8])
    assert out[1][0] >= 0.5 and out[1][1] < 0.05  # pooled: the down-weighted layer gets (almost) no 8 bits
    assert out[2][0] == out[2][1] > 0  # one band per layer: w_l cancels, equal shares


def test_band_map_and_running_quantiles() -> None:
    p = Precision(mode="tiers", bands=3)
    assert [p.band(i, 30) for i in range(30)] == [0] * 10 + [1] * 10 + [2] * 10
    assert [Precision(mode="tiers", bands=4).band(i, 6) for i in range(6)] == [0, 0, 1, 2, 2, 3]
    r = RunningScores(cap=100)
    u = r.quantile(0, torch.tensor([3.0, 1.0, 2.0]))  # a lone chunk is ranked against itself
    assert u.tolist() == [1.0, 0.0, 0.5]
    assert r.quantile(0, torch.tensor([2.0, 2.0])).tolist() == [0.5, 0.5]  # ties share their mean rank
    for c in range(10):
        u = r.quantile(0, uniform(50, c))
        assert bool(((u >= 0) & (u <= 1)).all())
    assert r.sorted[0].numel() <= 100  # thinned, bounded memory
    assert torch.equal(r.sorted[0], r.sorted[0].sort().values)
    with pytest.raises(ConfigError, match="precision.normalize=zscore is not one of: global, minmax, rank"):
        bind(Precision, {"mode": "tiers", "normalize": "zscore"}, "compressor.precision")
    with pytest.raises(ConfigError, match="precision.bands=0 must be"):
        bind(Precision, {"mode": "tiers", "bands": 0}, "compressor.precision")


def context(needle: bool, d: int = 16, n: int = 64) -> ScoreContext:
    """A mid-prompt chunk with an appended question; keys 40..43 match the question only with ``needle``."""
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    keys = torch.randn(1, 2, n + 4, d, generator=g) * 0.3
    keys -= (keys @ direction)[..., None] * direction  # filler: nearly orthogonal to the question
    keys += 0.05 * torch.randn(1, 2, n + 4, 1, generator=g) * direction
    if needle:
        keys[:, :, 40:44] = direction * 3
    keys[:, :, n:] = direction * 3
    queries = direction.expand(1, 4, 4, d) * 3
    logits = torch.matmul(queries, keys.repeat_interleave(2, dim=1).transpose(-1, -2)) * d**-0.5
    logits = logits.masked_fill(torch.ones(4, n + 4, dtype=torch.bool).triu_(n + 1), float("-inf"))
    return ScoreContext(layer_idx=0, n_layers=8, new_keys=keys, new_keys_pre=keys, queries=queries.clone(),
                        lse=torch.logsumexp(logits, dim=-1), positions=torch.arange(n + 4), n_store=n,
                        scaling=d**-0.5, prompt_len=10_000)


def test_absolute_terms_tell_a_filler_chunk_from_a_needle_chunk() -> None:
    for scale in ("absolute", "chunk"):
        s = SCORERS.build({"name": "prompt_guided", "term_scale": scale, "pool_kernel": 7, "beta": 0.0})
        f, n = s.score(context(False)), s.score(context(True))
        assert int(n.argmax()) in range(37, 47)
        if scale == "absolute":
            assert float(f.max()) < 0.6 * float(n.max())
        else:  # min-max per chunk: the filler chunk's best token scores as high as the needle
            assert float(f.max()) == pytest.approx(float(n.max()), abs=1e-3)
    with pytest.raises(ConfigError, match="term_scale"):
        SCORERS.build({"name": "prompt_guided", "term_scale": "zscore"})

"""Scorers, dynamic precision and selective propagation on the tiny GQA LLaMA."""

from __future__ import annotations

import pytest
import torch

from kvcomp.compressor.precision import Precision
from kvcomp.errors import ConfigError
from kvcomp.generation import greedy_generate
from kvcomp.propagator.base import decoder_layers
from kvcomp.registry import COMPRESSORS, PROPAGATORS, QUANTIZERS, SCORERS
from kvcomp.scorer.base import ScoreContext

SCORERS_CFG = ["prompt_guided", "snapkv", "h2o", "streaming_llm", "key_norm", "random"]


def unified(scorer: str = "none", quantizer: str = "none", propagation: str = "none", chunk: int = 64,
            precision: dict | None = None, **prop):
    q = QUANTIZERS.build({"name": quantizer})
    p = PROPAGATORS.build({"name": propagation, **prop})
    s = SCORERS.build({"name": scorer})
    return COMPRESSORS.build({"name": "unified", "chunk_size": chunk, "precision": precision or {}},
                             quantizer=q, propagator=p, scorer=s)


def needle_context(n: int = 64, needle: tuple[int, int] = (40, 44), d: int = 16) -> ScoreContext:
    """Keys where tokens 40..43 match the question's queries and everything else is noise."""
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(d, generator=g)
    keys = torch.randn(1, 2, n + 4, d, generator=g) * 0.1
    keys[:, :, needle[0] : needle[1]] = direction * 3
    keys[:, :, n:] = direction * 3  # the appended question tokens themselves
    queries = direction.expand(1, 4, 4, d) * 3
    pos = torch.arange(5000, 5000 + n + 4)  # mid-prompt
    logits = torch.matmul(queries, keys.repeat_interleave(2, dim=1).transpose(-1, -2)) * d**-0.5
    logits = logits.masked_fill(torch.ones(4, n + 4, dtype=torch.bool).triu_(n + 1), float("-inf"))
    return ScoreContext(layer_idx=3, n_layers=8, new_keys=keys, new_keys_pre=keys, queries=queries.clone(),
                        lse=torch.logsumexp(logits, dim=-1), positions=pos, n_store=n, scaling=d**-0.5,
                        prompt_len=10_000)


@pytest.mark.parametrize("name", SCORERS_CFG)
def test_scorer_shape_and_needle(name: str) -> None:
    ctx = needle_context()
    s = SCORERS.build({"name": name, **({"pool_kernel": 7} if name == "prompt_guided" else {})}).score(ctx)
    assert s.shape == (64,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    if name in ("prompt_guided", "snapkv", "h2o"):  # attention-based: the planted needle ranks first
        needle = s[40:44]
        assert bool((needle >= s.max() - 1e-6).all()), s  # every needle token holds the top score
        top = set(torch.topk(s, 4).indices.tolist())
        spread = 3 if name != "h2o" else 0  # prompt_guided / snapkv max-pool over 7 neighbours
        assert top <= set(range(40 - spread, 44 + spread)), top


def test_prompt_guided_terms_switch_off() -> None:
    ctx = needle_context()
    only = {t: SCORERS.build({"name": "prompt_guided", "pool_kernel": 7, "alpha": float(t == "a"),
                              "beta": float(t == "b"), "gamma": float(t == "g")}).score(ctx) for t in "abg"}
    assert only["a"].argmax() in range(37, 47) and only["g"].argmax() in range(37, 47)  # pooled over 7
    assert torch.allclose(only["b"], torch.zeros(64))  # mid-prompt positions: no positional prior
    with pytest.raises(ConfigError, match="scorer.alpha"):
        SCORERS.build({"name": "prompt_guided", "alpha": -1})


def test_prompt_guided_attention_from_leaves_the_attention_out_of_shallow_layers() -> None:
    """``attention_from``: layers shallower than that depth fraction score as if alpha were 0; deeper ones as the
    default (layer 3 of 8 is at depth 3/7 = 0.43)."""
    ctx = needle_context()
    default = SCORERS.build({"name": "prompt_guided"}).score(ctx)
    no_attention = SCORERS.build({"name": "prompt_guided", "alpha": 0.0}).score(ctx)
    assert not torch.allclose(default, no_attention)
    for frac, want in ((0.5, no_attention), (0.43, no_attention), (0.42, default), (0.0, default)):
        got = SCORERS.build({"name": "prompt_guided", "attention_from": frac}).score(ctx)
        assert torch.equal(got, want), frac
    with pytest.raises(ConfigError, match="scorer.attention_from"):
        SCORERS.build({"name": "prompt_guided", "attention_from": 1.5})


@pytest.mark.parametrize(("u", "tier"), [(1.0, 8), (0.7, 8), (0.6999, 4), (0.3, 4), (0.2999, 2), (0.0, 2)])
def test_tier_boundaries(u: float, tier: int) -> None:
    p = Precision(mode="tiers", theta_h=0.7, theta_m=0.3, protect_sinks=0, normalize="minmax")
    scores = torch.tensor([0.0, u, 1.0])  # min-max keeps u as is
    assert int(p(scores, torch.arange(100, 103))[1]) == tier


def test_drop_low_budget_and_sinks() -> None:
    p = Precision(mode="tiers", drop_low=True, protect_sinks=2, normalize="minmax")
    bits = p(torch.tensor([0.0, 0.0, 0.1, 1.0, 0.5]), torch.arange(5))
    assert bits.tolist() == [8, 8, 0, 8, 4]
    budget = Precision(mode="budget", keep_ratio=0.5, protect_sinks=0)
    b = budget(torch.tensor([0.1, 0.9, 0.5, 0.2]), torch.arange(9, 13))
    assert b.tolist() == [0, -1, -1, 0]
    k = Precision(mode="budget", keep_tokens=10, protect_sinks=0)(torch.rand(40), torch.arange(40), prompt_len=100)
    assert int((k != 0).sum()) == 4  # 10 of a 100-token prompt = 10 % of each chunk
    with pytest.raises(ConfigError, match="theta_m < theta_h"):
        Precision(mode="tiers", theta_h=0.3, theta_m=0.5)


def test_mixed_precision_is_real_storage(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 256), generator=torch.Generator().manual_seed(1))
    stats = {}
    for mode in ("none", "tiers"):
        comp = unified("key_norm", "uniform", precision={"mode": mode, "normalize": "rank"})
        with comp.session(model) as s:
            s.prefill(ids)
        cache = s.cache
        stats[mode] = cache.get_compression_stats()
        widths = {getattr(b, "bits", 16) for layer in cache.layers for b in layer.k_blocks}
        assert widths == ({4} if mode == "none" else {2, 4, 8})
    assert stats["tiers"]["avg_key_bits"] != stats["none"]["avg_key_bits"]


def test_every_component_off_reproduces_full_cache(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    for comp in (unified(chunk=40), unified("random", propagation="layer_ratio", early=1.0, middle=1.0, late=1.0,
                                            chunk=40)):
        with comp.session(model, ids[:, -5:]) as s:
            last = s.prefill(ids)
        assert torch.allclose(last, ref, atol=1e-4), (last - ref).abs().max()


def count_layer_inputs(model) -> tuple[list[int], list]:
    seen: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"].shape[1]),
                                             with_kwargs=True) for layer in decoder_layers(model)]
    return seen, hooks


def test_dropped_tokens_never_reach_later_layers(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(3))
    comp = unified("snapkv", propagation="layer_ratio", chunk=0, keep_last=0, budget="chunk")
    with comp.session(model) as s:
        seen, hooks = count_layer_inputs(model)  # registered after ours: sees the sliced kwargs
        s.prefill(ids)
    cache = s.cache
    for h in hooks:
        h.remove()
    # 4 layers: ratios 0.8, 0.8, 0.6, 0.4 (early = layers 0-1 as 1 < 0.3 * 4) apply to what leaves a layer:
    # shares 1, 0.8, 0.8, 0.6 (propagator.layer_shares); the last layer's 0.4 never applies
    assert seen == [200, 160, 160, 120]
    held = [layer.held() for layer in cache.layers]
    assert held == seen  # later layers cache only the propagated tokens
    pos = [torch.cat(layer.pos_blocks).tolist() for layer in cache.layers]
    assert set(pos[3]) <= set(pos[2]) <= set(pos[1]) <= set(pos[0]) == set(range(200))
    assert pos[3] == sorted(pos[3])  # kept tokens keep their own positions, in order


def test_decode_after_propagation_keeps_absolute_positions(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(3))
    comp = unified("snapkv", propagation="layer_ratio", chunk=64, keep_last=0)
    with comp.session(model) as s:
        gen = greedy_generate(s, ids, 5, set())
    cache = s.cache
    assert len(gen.tokens) == 5
    assert cache.get_seq_length() == 204
    for layer in cache.layers:  # 4 generated tokens were decoded at 200..203, in every layer
        pos = torch.cat([*layer.pos_blocks, *([] if layer.res_pos is None else [layer.res_pos])]).tolist()
        assert pos[-4:] == [200, 201, 202, 203], (layer.layer_idx, pos[-6:])
    # fp16 reference: every token of the sequence in every layer, including those propagation dropped
    cfg = model.config
    per_tok = 2 * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)  # K+V, fp16
    assert min(layer.held() for layer in cache.layers) < 204
    assert cache.get_compression_stats()["kv_bytes_fp16"] == 204 * len(cache.layers) * per_tok


def test_generate_after_propagation_and_drops(tiny) -> None:
    model, tok = tiny
    ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(4))
    for exp in (dict(scorer="prompt_guided", quantizer="kvquant_stream", propagation="layer_ratio",
                     precision={"mode": "tiers", "drop_low": True}),
                dict(scorer="snapkv", propagation="fastkv_tsp", precision={"mode": "budget", "keep_ratio": 0.3})):
        comp = unified(chunk=64, **exp)
        with comp.session(model, ids[:, -6:]) as s:
            gen = greedy_generate(s, ids, 20, set())
        cache = s.cache
        assert len(gen.tokens) == 20 and cache.get_seq_length() == 319
        assert cache.get_compression_stats()["tokens_dropped"] > 0


def test_propagation_needs_a_scorer() -> None:
    with pytest.raises(ConfigError, match="needs importance scores|choose a scorer"):
        unified(propagation="layer_ratio")
    with pytest.raises(ConfigError, match="quantizer=none"):
        unified("snapkv", precision={"mode": "tiers"})


def test_question_guides_every_chunk(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 130), generator=torch.Generator().manual_seed(5))
    comp = unified("prompt_guided", chunk=50)
    lengths: list[int] = []
    h = model.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)
    with comp.session(model, ids[:, -7:]) as s:
        s.prefill(ids)
    cache = s.cache
    h.remove()
    assert lengths == [57, 57, 30]  # question appended to the two non-final chunks
    assert cache.get_seq_length() == 130 and cache.layers[0].held() == 130  # its K/V never stored


def test_propagation_with_flash_attention_is_a_config_error(tiny, monkeypatch) -> None:
    model, _ = tiny
    comp = unified("snapkv", propagation="layer_ratio", chunk=64)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ConfigError, match="attn_implementation=flash_attention_2"):
        with comp.session(model):
            pass

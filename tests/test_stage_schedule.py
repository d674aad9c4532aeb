"""The stage schedule of selective propagation: FastKV's selection against a direct implementation, the
schedule's selection points and what it reports (tiny LLaMA, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from kvcomp.registry import COMPRESSORS, PROPAGATORS, QUANTIZERS, SCORERS

T, CHUNK = 300, 64


def fastkv(schedule: str = "stage", **prop):
    return COMPRESSORS.build({"name": "unified", "chunk_size": CHUNK}, quantizer=QUANTIZERS.build({"name": "none"}),
                             propagator=PROPAGATORS.build({"name": "fastkv_tsp", "schedule": schedule, **prop}),
                             scorer=SCORERS.build({"name": "snapkv"}))


def direct_tsp(model, ids: torch.Tensor, layer: int, rate: float, window: int = 8, kernel: int = 7,
               pool: str = "max", length: int | None = None, heads: str = "sum") -> set[int]:
    """FastKV's TSP selection written out on the plain model's full-prompt forward: layer ``layer``'s queries and
    keys from its input hidden state, the last ``window`` queries' softmax over every key (additive causal mask
    on the window, as the official code does), summed over the window, max- or average-pooled, summed over heads;
    ``int(T * rate)`` tokens carried, or ``length`` (its constant mode). ``heads=max``: the largest KV head's
    query-group sum instead of the sum over heads (kvcomp's option, not the official code)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]  # the input of `layer`
        dec = model.model.layers[layer]
        attn, x = dec.self_attn, dec.input_layernorm(hs)
        cfg = model.config
        d = cfg.hidden_size // cfg.num_attention_heads
        q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        w = torch.matmul(q[..., -window:, :], k.transpose(2, 3)) / math.sqrt(d)
        mask = torch.full((window, window), torch.finfo(w.dtype).min)
        cond = torch.arange(window)
        mask.masked_fill_(cond < (cond + 1).view(window, 1), 0)
        w[..., -window:] += mask
        s = torch.softmax(w, dim=-1)[..., :-window].sum(dim=-2)
        pool1d = torch.nn.functional.max_pool1d if pool == "max" else torch.nn.functional.avg_pool1d
        s = pool1d(s, kernel, padding=kernel // 2, stride=1)
        hkv = attn.k_proj.out_features // d
        s = s.sum(dim=1)[0] if heads == "sum" else s[0].view(hkv, -1, s.shape[-1]).sum(dim=1).max(dim=0).values
        top = s.topk((int(T * rate) if length is None else length) - window).indices
    return {int(i) for i in top} | set(range(T - window, T))


@pytest.mark.parametrize(("pool", "tsp_len", "heads"), [("max", None, "sum"), ("avg", None, "sum"), ("max", 100, "sum"),
                                                        ("max", None, "max")])
def test_fastkv_stage_selection_is_fastkvs(tiny, pool: str, tsp_len: int | None, heads: str) -> None:
    """The tokens the stage schedule carries past the TSP layer are exactly FastKV's selection computed directly
    on the whole prompt (no KV budget, fp32 store: the layers below see what the plain model does), with either
    pooling, by rate (proportional mode) or by count (constant mode, ``tsp_len``)."""
    model, _ = tiny
    ids = torch.randint(3, 250, (1, T), generator=torch.Generator().manual_seed(3))
    comp = fastkv(tsp_rate=0.3, pool=pool, tsp_len=tsp_len, heads=heads)
    with comp.session(model) as s:
        s.prefill(ids)
    tsp = 1  # L // 2 - 1 of 4 layers (FastKV's 15 of 32)
    kept = {int(p) for p in s.cache.layers[tsp + 1].held_positions()}
    assert kept == direct_tsp(model, ids, tsp, 0.3, pool=pool, length=tsp_len, heads=heads)
    assert len(kept) == (int(0.3 * T) if tsp_len is None else tsp_len)
    assert s.cache.layers[tsp].held() == T  # the TSP layer itself computes every token
    assert comp.settings()["propagation_schedule"] == "stage"
    assert s.stats()["stage_boundary_bytes"] == T * (64 + 2 * 16) * 4  # boundary states + TSP layer's keys


def test_stage_points_and_shares() -> None:
    lr = PROPAGATORS.build({"name": "layer_ratio"})
    assert lr.points(30) == [(0, 0.8), (9, 0.6), (21, 0.4)]  # SmolLM2: three selection points
    assert PROPAGATORS.build({"name": "fastkv_tsp"}).points(30) == [(14, 0.2)]  # FastKV: 15 of 32 -> 14 of 30
    assert PROPAGATORS.build({"name": "fastkv_tsp"}).points(32) == [(15, 0.2)]
    assert PROPAGATORS.build({"name": "none"}).points(30) == []
    assert not PROPAGATORS.build({"name": "layer_ratio", "schedule": "chunk"}).staged(30)


@pytest.mark.parametrize("score_layers", ["point", "stage"])
def test_stage_layer_ratio_keeps_the_share_and_the_prompt_end(tiny, score_layers: str) -> None:
    """layer_ratio through the stage schedule: each layer holds its share of the prompt's candidates (plus the
    protected prompt end), decided over the whole prompt, and the layers are restored after prefill."""
    model, _ = tiny
    ids = torch.randint(3, 250, (1, T), generator=torch.Generator().manual_seed(4))
    layers = list(model.model.layers)
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": CHUNK}, quantizer=QUANTIZERS.build({"name": "none"}),
                             propagator=PROPAGATORS.build({"name": "layer_ratio", "keep_last": 16,
                                                           "score_layers": score_layers}),
                             scorer=SCORERS.build({"name": "prompt_guided"}))
    q = ids[:, -8:]
    with comp.session(model, q) as s:
        s.prefill(ids)
        assert list(model.model.layers) == layers
        prot = 16 + 8
        shares = comp.propagator.layer_shares(4)  # 1, 0.8, 0.8, 0.6
        for layer, share in zip(s.cache.layers, shares, strict=True):
            pos = layer.held_positions().long()
            assert pos.numel() == round(share * (T - prot)) + prot
            assert set(range(T - prot, T)) <= {int(p) for p in pos}
        s.step(ids[:, :1])  # decode runs every layer at the next absolute position
        assert all(int(layer.held_positions()[-1]) == T for layer in s.cache.layers)


def test_budget_at_end_keeps_the_share_of_each_layer(tiny) -> None:
    """precision.budget_at=end: nothing dropped while streaming; at the prompt end each layer keeps
    keep_ratio of what it holds, the observation window (last 32 queries' tokens) and the sinks among them."""
    model, _ = tiny
    ids = torch.randint(3, 250, (1, T), generator=torch.Generator().manual_seed(5))
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": CHUNK,
                              "precision": {"mode": "budget", "keep_ratio": 0.5, "budget_at": "end"}},
                             quantizer=QUANTIZERS.build({"name": "uniform", "key_bits": 16, "value_bits": 16,
                                                         "pre_rope": False}),
                             propagator=PROPAGATORS.build({"name": "fastkv_tsp", "tsp_rate": 0.4, "tsp_layer": 2}),
                             scorer=SCORERS.build({"name": "snapkv"}))
    with comp.session(model) as s:
        s.prefill(ids)
    for i, layer in enumerate(s.cache.layers):
        carried = T if i <= 2 else int(0.4 * T)
        pos = {int(p) for p in layer.held_positions()}
        assert len(pos) == round(0.5 * carried), i
        window = 32 if i <= 2 else 8  # past the TSP layer only FastKV's window is carried contiguously
        assert set(range(T - window, T)) <= pos
        assert i > 2 or set(range(4)) <= pos  # the sinks, where they were carried


@pytest.mark.parametrize(("keep", "tokens"), [({"keep_ratio": 0.2}, 60), ({"keep_tokens": 45}, 45)])
def test_budget_of_the_prompt_is_one_capacity_for_every_layer(tiny, keep: dict, tokens: int) -> None:
    """precision.keep_of=prompt (FastKV's retain_rate): every layer keeps the same count, keep_ratio x the prompt
    length (or keep_tokens), also past the TSP layer where it holds fewer (there 60 of the 120 carried, FastKV's
    retain_rate / tsp_rate); the observation window stays; a layer holding fewer than that keeps them all."""
    model, _ = tiny
    ids = torch.randint(3, 250, (1, T), generator=torch.Generator().manual_seed(6))
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": CHUNK,
                              "precision": {"mode": "budget", "budget_at": "end", "keep_of": "prompt",
                                            "protect_sinks": 0, **keep}},
                             quantizer=QUANTIZERS.build({"name": "uniform", "key_bits": 16, "value_bits": 16,
                                                         "pre_rope": False}),
                             propagator=PROPAGATORS.build({"name": "fastkv_tsp", "tsp_rate": 0.4}),
                             scorer=SCORERS.build({"name": "snapkv", "window": 8}))
    with comp.session(model) as s:
        s.prefill(ids)
    held = [layer.held() for layer in s.cache.layers]
    assert held == [tokens] * 4
    assert all(set(range(T - 8, T)) <= {int(p) for p in layer.held_positions()} for layer in s.cache.layers)
    small = comp.policy.end_keep(30, T)
    assert small == 30  # capped by what a layer holds


def test_keep_of_prompt_and_tsp_len_are_refused_where_they_mean_nothing() -> None:
    from kvcomp.errors import ConfigError

    with pytest.raises(ConfigError, match="keep_of=prompt needs compressor.precision.budget_at=end"):
        COMPRESSORS.build({"name": "unified", "precision": {"mode": "budget", "keep_of": "prompt"}})
    with pytest.raises(ConfigError, match="tsp_len=100 needs propagation.schedule=stage"):
        PROPAGATORS.build({"name": "fastkv_tsp", "tsp_len": 100, "schedule": "chunk"})
    with pytest.raises(ConfigError, match="pool=mean is not one of: max, avg"):
        PROPAGATORS.build({"name": "fastkv_tsp", "pool": "mean"})


def test_fastkv_reports_the_question_it_reads(tiny) -> None:
    """FastKV's stage selection and its budget read no question: the kept tokens and the logits are the same with
    either question or none, and metrics.json says ``question: unused`` (the experiment as composed too); the chunk
    ablation protects the question's length (``length``); prompt_guided reports its timing."""
    from conftest import compose

    from kvcomp.experiment import build_parts

    model, _ = tiny
    ids = torch.randint(3, 250, (1, T), generator=torch.Generator().manual_seed(5))
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": CHUNK, "precision": {
        "mode": "budget", "keep_ratio": 0.1, "keep_of": "prompt", "budget_at": "end", "protect_sinks": 0}},
        quantizer=QUANTIZERS.build({"name": "none"}), propagator=PROPAGATORS.build({"name": "fastkv_tsp"}),
        scorer=SCORERS.build({"name": "snapkv", "window": 8}))
    seen = []
    for q in (None, ids[:, -5:], ids[:, :17]):
        with comp.session(model, q) as s:
            last = s.prefill(ids)
        seen.append((last, [layer.held_positions().tolist() for layer in s.cache.layers]))
    for last, held in seen[1:]:
        assert torch.equal(last, seen[0][0]) and held == seen[0][1]
    assert comp.settings()["question"] == "unused"
    assert fastkv("chunk").settings()["question"] == "length"
    assert build_parts(compose(["+experiment=fastkv"])).compressor.settings()["question"] == "unused"
    pg = build_parts(compose(["+experiment=prompt_guided", "compressor.question=end"])).compressor
    assert pg.settings() == {"question": "end", "propagation_schedule": "stage"}

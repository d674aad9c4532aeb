"""Question timing: oracle / end / none, the end pass (demote or drop, never promote), the log line."""

from __future__ import annotations

import logging

import pytest
import torch

from kvcomp.cache.rewrite import demote, held_positions
from kvcomp.compressor import timing
from kvcomp.errors import ConfigError
from kvcomp.generation import greedy_generate
from kvcomp.registry import COMPRESSORS, PROPAGATORS, QUANTIZERS, SCORERS

TIERS = {"mode": "tiers", "drop_low": True}


def unified(question: str, precision: dict | None = None, propagation: str = "none", scorer: str = "prompt_guided"):
    return COMPRESSORS.build({"name": "unified", "chunk_size": 64, "question": question,
                              "precision": TIERS if precision is None else precision},
                             quantizer=QUANTIZERS.build({"name": "kvquant_stream"}),
                             propagator=PROPAGATORS.build({"name": propagation}),
                             scorer=SCORERS.build({"name": scorer}))


def widths(layer) -> dict[int, int]:
    """Position -> key width of every token a layer holds."""
    return {int(p): b.width for b, pos in zip(layer.k_blocks, layer.pos_blocks, strict=True) for p in pos.tolist()}


def forward_lengths(model, comp, ids, question):
    lengths: list[int] = []
    h = model.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        with comp.session(model, question) as sess:
            sess.prefill(ids)
    finally:
        h.remove()
    return lengths, sess.cache


def test_timings_differ_in_what_the_forward_sees(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 150), generator=torch.Generator().manual_seed(7))
    q = ids[:, -6:]
    seen = {t: forward_lengths(model, unified(t), ids, q) for t in ("oracle", "end", "none")}
    assert seen["oracle"][0] == [70, 70, 22]  # question appended to the non-final chunks
    assert seen["end"][0] == seen["none"][0] == [64, 64, 22]  # never appended
    for t, (_, cache) in seen.items():  # drops: oracle/none while streaming, end only in the end pass
        assert cache.get_compression_stats()["tokens_dropped"] > 0, t
    assert unified("end").settings() == {"question": "end", "propagation_schedule": "none"}
    with pytest.raises(ConfigError, match="compressor.question=later is not one of: oracle, end, none"):
        unified("later")


def test_end_pass_demotes_or_drops_and_never_promotes(tiny, monkeypatch) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(8))
    comp = unified("end")
    before: dict[int, dict[int, int]] = {}
    real = timing.prompt_end

    def spy(run, scoring, policy):
        c = run.cache
        before.update({i: widths(layer) for i, layer in enumerate(c.layers)})
        assert c.get_compression_stats()["tokens_dropped"] == 0  # drops were deferred while streaming
        assert min(w for layer in before.values() for w in layer.values()) == 4  # held at hold_bits, at least
        return real(run, scoring, policy)

    monkeypatch.setattr("kvcomp.compressor.unified.prompt_end", spy)
    with comp.session(model, ids[:, -6:]) as sess:
        sess.prefill(ids)
    cache = sess.cache
    assert before, "the end pass did not run"
    dropped = 0
    for i, layer in enumerate(cache.layers):
        after = widths(layer)
        assert set(after) <= set(before[i])
        assert all(after[p] <= before[i][p] for p in after)  # no promotion
        dropped += len(before[i]) - len(after)
        assert any(after[p] < before[i][p] for p in after) or len(after) < len(before[i])
        assert min(after.values()) == 2 or len(after) < len(before[i])  # demoted below the hold width
    assert dropped == cache.get_compression_stats()["tokens_dropped"] > 0
    assert all(p in widths(layer) for layer in cache.layers for p in range(4))  # sinks kept


def test_demote_leaves_unchanged_blocks_bit_exact(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 128), generator=torch.Generator().manual_seed(9))
    comp = unified("oracle", precision={"mode": "none"}, scorer="snapkv")
    with comp.session(model) as sess:
        sess.prefill(ids)
    cache = sess.cache
    layer = cache.layers[1]
    first, second = layer.k_blocks[-2], layer.k_blocks[-1]  # two 4-bit chunks (sinks are a block of their own)
    n_first, n_second = layer.pos_blocks[-2].numel(), layer.pos_blocks[-1].numel()
    bits = torch.full((layer.held(),), -1)
    bits[-n_second:] = 2
    bits[-5:] = 0
    bits[-n_second - n_first] = 8  # a promotion request: ignored
    assert demote(layer, bits) == 5
    assert layer.k_blocks[-2 if layer.k_blocks[-2] is first else -3] is first
    assert layer.k_blocks[-1].width == 2 and layer.k_blocks[-1] is not second
    assert sorted(held_positions(layer).tolist()) == list(range(123))
    with pytest.raises(ValueError, match="widths for"):
        demote(layer, torch.zeros(3))


def test_missing_question_is_said_once(tiny, caplog) -> None:
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 100), generator=torch.Generator().manual_seed(10))
    timing._said.clear()
    with caplog.at_level(logging.WARNING, logger="kvcomp.compressor.timing"):
        for question in (ids[:, -5:], None, None):
            comp = unified("none" if question is not None else "end")
            with comp.session(model, question) as sess:
                greedy_generate(sess, ids, 2, set())
    said = [r.getMessage() for r in caplog.records if "needs a question" in r.getMessage()]
    assert len(said) == 2  # once for question=none, once for end without a question
    assert "compressor.question=none" in said[0] and "compressor.question=end" in said[1]


def test_end_budget_with_full_precision_store_drops_and_keeps_the_rest_bit_exact(tiny) -> None:
    """quantizer=none + budget_at=end (kvpress-like eviction after the prompt): the dense store has nothing to
    re-encode, so the late pass only drops; every kept token is the token the full cache holds (no fp16 round trip)."""
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 150), generator=torch.Generator().manual_seed(10))
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": 64, "question": "end",
                              "precision": {"mode": "budget", "keep_ratio": 0.5, "budget_at": "end"}},
                             quantizer=QUANTIZERS.build({"name": "none"}),
                             propagator=PROPAGATORS.build({"name": "none"}), scorer=SCORERS.build({"name": "snapkv"}))
    with comp.session(model, ids[:, -6:]) as sess:
        sess.prefill(ids)
    full = model(ids, use_cache=True).past_key_values
    for i, layer in enumerate(sess.cache.layers):
        held = held_positions(layer).long()
        assert abs(held.numel() - 75) <= 1  # half of the 150 tokens, decided once at the end
        k, _ = layer.materialize()
        ref = full.layers[i].keys[..., held, :]
        assert k.dtype == ref.dtype
        # layer 0 sees the same inputs (bit-exact); deeper layers differ by the chunked attention's rounding
        assert torch.equal(k, ref) if i == 0 else torch.allclose(k, ref, atol=1e-4)


def test_stage_selection_scores_with_the_queries_own_positions_when_few_tokens_are_held(tiny) -> None:
    """prompt_guided budget 0.5 with 80/60/40 propagation and the question appended to the prompt's chunks: after the
    stages, a layer can hold fewer tokens than the trailing query window (the question's queries are never stored).
    The question-aware scores then mask with the queries' own positions; taking the held tokens' last positions for
    them raised a shape error (46 held vs a 50-query window) on a short prompt."""
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 60), generator=torch.Generator().manual_seed(3))
    question = torch.randint(3, 250, (1, 50), generator=torch.Generator().manual_seed(4))
    comp = COMPRESSORS.build({"name": "unified", "chunk_size": 64, "question": "oracle",
                              "precision": {"mode": "budget", "keep_ratio": 0.5}},
                             quantizer=QUANTIZERS.build({"name": "kvquant_stream"}),
                             propagator=PROPAGATORS.build({"name": "layer_ratio"}),
                             scorer=SCORERS.build({"name": "prompt_guided"}))
    with comp.session(model, question) as sess:
        logits = sess.prefill(ids)
    assert torch.isfinite(logits).all()
    window = max(q.shape[2] for q, _, _ in sess.scoring.last_queries.values())
    held = [layer.held() for layer in sess.cache.layers]
    assert min(held) < window  # the case that failed: fewer held tokens than trailing queries
    assert all(0 < h < 60 for h in held)


def test_end_budget_protects_the_queries_own_tokens_not_the_last_held(tiny) -> None:
    """budget_at=end keeps the held tokens at the prompt end's queries' own positions (the observation window), the
    sinks, and the rest by score. When the last queries are not the last held tokens (an appended question's
    queries are never stored), no prompt token is protected in their place: the kept set is the sinks plus the top
    scores. Protecting the last ``w`` held tokens instead (the rule before) keeps the prompt's tail regardless."""
    model, _ = tiny
    t = 150
    ids = torch.randint(3, 250, (1, t), generator=torch.Generator().manual_seed(11))
    question = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(12))
    comp = unified("end", {"mode": "budget", "keep_ratio": 0.2, "budget_at": "end"}, scorer="snapkv")
    with comp.session(model, question) as sess:  # the storage order of kvquant_stream is not position order
        sess.prefill(ids)
    for layer, (_, _, q_pos) in zip(sess.cache.layers, sess.scoring.last_queries.values(), strict=True):
        assert set(q_pos.tolist()) <= set(held_positions(layer).tolist())  # the window's own tokens stay
    with comp.session(model, question) as sess:
        sess.scoring.end_pass = None  # the end pass runs below, after the queries are moved
        sess.prefill(ids)
        for i, (q, scaling, _) in list(sess.scoring.last_queries.items()):  # an appended question's positions
            sess.scoring.last_queries[i] = (q, scaling, t + torch.arange(q.shape[2]))
        scores, positions, _ = timing.end_scores(sess, sess.scoring, lambda i: i)
        timing.budget_end(sess, sess.scoring, comp.policy)
    for i, layer in enumerate(sess.cache.layers):
        s, pos = scores[i].clone(), positions[i].long()
        s[pos < comp.policy.protect_sinks] = float("inf")
        want = pos[torch.topk(s, comp.policy.end_keep(pos.numel(), t)).indices]
        assert set(held_positions(layer).tolist()) == set(want.tolist()), i


@pytest.mark.parametrize("bits, skipped", [([4, 4, 2], True), ([8, 4, 2], False)])
def test_chunks_are_not_scored_when_no_width_depends_on_it(tiny, bits, skipped) -> None:
    """question: end with every tier at or below hold_bits (prompt_guided_end): chunks are held at 4 bits whatever
    their scores, so they are not scored; the cache and the logits equal those of a run that scores them."""
    model, _ = tiny
    ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(11))
    precision = {**TIERS, "bits": bits, "theta_h": 0.7, "theta_m": 0.3}
    runs = {}
    for force in (False, True):
        comp = unified("end", precision)
        calls = []
        real = comp.scorer.score
        comp.scorer.score = lambda ctx, real=real, calls=calls: calls.append(ctx.n_store) or real(ctx)
        with comp.session(model, ids[:, -6:]) as sess:
            assert sess.scoring.streaming is not skipped
            sess.scoring.streaming = sess.scoring.streaming or force
            logits = sess.prefill(ids)
        cache = sess.cache
        runs[force] = ([widths(layer) for layer in cache.layers], logits, len(calls),
                       cache.get_compression_stats()["tokens_dropped"])
    assert runs[False][0] == runs[True][0] and torch.equal(runs[False][1], runs[True][1])
    assert runs[False][3] == runs[True][3] > 0
    n_layers = len(runs[False][0])
    assert runs[False][2] == (n_layers if skipped else runs[True][2])  # skipped: the end pass's scores only
    assert runs[True][2] > n_layers

"""Fidelity to the full cache (teacher-forced answer, KL, top-1 agreement), its on-disk reference store, and the
intervals on every quality number (kvcomp.stats)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose

TINY = ["model=tiny_llama", "task=offline_suite", "task.context_length=160", "task.n_samples=2",
        "task.subtasks=[passkey,needle]", "task.fidelity=true"]


def _comp(exp: str):
    from kvcomp.experiment import build_parts

    return build_parts(compose([f"+experiment={exp}", "model=tiny_llama"])).compressor


@pytest.mark.parametrize("exp", ["full_cache", "kvquant_stream", "prompt_guided"])
def test_teacher_forcing_leaves_generation_alone_and_matches_a_fresh_prefill(tiny, exp: str) -> None:
    """Generation with teacher_ids gives the same tokens as without; the forced log-probs (cache restored to its
    state after the prefill) equal those of a fresh prefill followed by the same decode steps."""
    from kvcomp.engine import Engine
    from kvcomp.fidelity import teacher_force

    model, tok = tiny
    eng = Engine(model, tok, _comp(exp))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 200, (300,), generator=g).tolist()
    question = prompt[-8:]
    target = [7, 11, 13, 17, 19]
    text0, gen0 = eng.generate(prompt, 6, question)
    text1, gen1 = eng.generate(prompt, 6, question, teacher_ids=target)
    assert gen0.tokens == gen1.tokens and text0 == text1
    assert gen1.forced is not None and gen1.forced.shape == (len(target), model.config.vocab_size)
    comp = eng.compressor
    with comp.session(model, torch.tensor([question])) as s:
        last = s.prefill(torch.tensor([prompt]))
        ref = teacher_force(model, s.cache, last, target)
    torch.testing.assert_close(gen1.forced, ref, rtol=0, atol=1e-5)
    logp, _ = eng.teacher_forced(prompt, target, question)
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-5)


def test_a_snapshot_restores_once_and_later_appends_do_not_leak_into_it(tiny) -> None:
    """After a restore the cache owns the snapshot's tensors and appends into them in place; a second restore from
    the same snapshot would bring back those appends, so it raises."""
    from kvcomp.fidelity import restore, snapshot, teacher_force

    model, _ = tiny
    comp = _comp("kvquant_stream")
    prompt = torch.randint(5, 200, (1, 200), generator=torch.Generator().manual_seed(1))
    with comp.session(model, prompt[:, -8:]) as s:
        last = s.prefill(prompt)
        state = snapshot(s.cache)
        first = teacher_force(model, s.cache, last, [7, 11, 13])
        restore(s.cache, state)
        again = teacher_force(model, s.cache, last, [7, 11, 13])
        with pytest.raises(ValueError, match="already restored"):
            restore(s.cache, state)
    torch.testing.assert_close(again, first, rtol=0, atol=1e-5)


def test_scores_of_identical_and_different_distributions() -> None:
    from kvcomp.fidelity import scores

    ref = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]]), -1)
    same = scores(ref, ref, [0, 1])
    assert same["kl_full"] == 0.0 and same["top1_agree"] == 1.0 and same["answer_nll"] == same["answer_nll_full"]
    other = torch.log_softmax(torch.tensor([[0.0, 2.0, -1.0], [0.0, 3.0, 0.0]]), -1)
    d = scores(ref, other, [0, 1])
    assert d["top1_agree"] == 0.5 and d["kl_full"] > 0.1 and d["answer_nll"] > same["answer_nll"]


def test_runs_reuse_the_stored_baseline_and_repeat_exactly(tmp_path: Path) -> None:
    """The full cache's log-probs are computed once: a second run (another method, then the same one again)
    only hits; same seed -> same fidelity numbers; compare_baseline adds paired differences."""
    from kvcomp.experiment import run

    store = [f"task.fidelity_cache_dir={tmp_path / 'fid'}"]
    full = run(compose(["+experiment=full_cache", *TINY, *store]))
    assert full["fidelity_cache_misses"] == 4 and full["kl_full"] == 0.0 and full["top1_agree"] == 1.0
    a = run(compose(["+experiment=kvquant_stream", *TINY, *store]), tmp_path / "a")
    b = run(compose(["+experiment=kvquant_stream", *TINY, *store, "compare_baseline=true"]))
    assert a["fidelity_cache_hits"] == 4 and a["fidelity_cache_misses"] == 0
    assert b["fidelity_cache_misses"] == 0 and b["fidelity_cache_hits"] == 8  # its run + the baseline's
    for k in ("kl_full", "answer_nll", "top1_agree"):
        assert a[k] == b[k] and a["ci"][k] == b["ci"][k]
    assert a["kl_full"] > 0 and a["ci"]["kl_full"]["n"] == 4 and a["ci"]["score_passkey"]["n"] == 2
    assert a["ci"]["score"]["method"] == "wilson" and a["ci"]["kl_full"]["method"] == "bootstrap"
    assert {"score", "answer_nll"} <= set(b["diff_vs_baseline"])
    rec = json.loads((tmp_path / "a" / "predictions.jsonl").read_text().splitlines()[0])
    assert {"answer_nll", "kl_full", "top1_agree", "answer_nll_full"} <= set(rec)
    assert len(list((tmp_path / "fid").rglob("*.pt"))) == 4 and not list((tmp_path / "fid").rglob("*.tmp"))


def test_wikitext_continuation_and_kl_objective(tmp_path: Path) -> None:
    from kvcomp.experiment import run

    m = run(compose(["+experiment=int8", "model=tiny_llama", "task=wikitext2_ppl", "task.mode=continuation",
                     "task.seq_len=128", "task.continuation_tokens=8", "task.max_windows=2", "task.fidelity=true",
                     f"task.fidelity_cache_dir={tmp_path}", "objective=[kl_full,kv_bytes]"]))
    assert m["n_tokens"] == 16 and m["ppl"] > 1 and m["objective"] == [m["kl_full"], m["kv_bytes"]]
    assert 0 <= m["kl_full"] < 1e-3


def test_intervals_are_library_wilson_and_seeded_bootstrap() -> None:
    from scipy.stats import binomtest

    from kvcomp.stats import interval, paired

    w = interval([1, 1, 1, 0] * 10, scale=100.0)
    ci = binomtest(30, 40).proportion_ci(method="wilson")
    assert w["method"] == "wilson" and w["mean"] == 75.0 and w["low"] == pytest.approx(100 * ci.low)
    x = [0.1, 0.5, 0.2, 0.9, 0.3, 0.4]
    assert interval(x, seed=3) == interval(x, seed=3) and interval(x)["method"] == "bootstrap"
    lo, hi = interval(x)["low"], interval(x)["high"]
    assert lo < sum(x) / len(x) < hi
    assert paired([1.0] * 30, [0.0] * 15 + [1.0] * 15)["significant"]
    assert not paired([1.0, 0.0] * 15, [0.0, 1.0] * 15)["significant"]


@pytest.mark.slow
def test_smollm2_int8_is_faithful_kvquant_stream_less(smollm2, tmp_path: Path) -> None:
    """On the real model, int8's KL to the full cache is tiny and kvquant_stream's larger, window by window."""
    from kvcomp.engine import Engine
    from kvcomp.fidelity import ReferenceStore, compare
    from kvcomp.task.wikitext2_ppl import WikiText2PPL

    model, tok = smollm2
    samples = WikiText2PPL(seq_len=400, max_windows=2, mode="continuation", continuation_tokens=8).samples(tok)
    store = ReferenceStore(tmp_path)
    kl = {}
    for exp in ("int8", "kvquant_stream"):
        from kvcomp.experiment import build_parts

        eng = Engine(model, tok, build_parts(compose([f"+experiment={exp}"])).compressor)
        kl[exp] = [compare(eng, store, s.prompt_ids, s.target_ids, eng.teacher_forced(s.prompt_ids, s.target_ids)[0])
                   ["kl_full"] for s in samples]
    assert store.misses == 2 and store.hits == 2
    assert max(kl["int8"]) < 1e-3
    assert all(q > i for q, i in zip(kl["kvquant_stream"], kl["int8"]))


def test_peers_report_states_each_equal_bytes_pair_with_its_interval(tmp_path: Path) -> None:
    from benchmarks.peers_report import write_report

    def row(name: str, system: str, kv: float, hits: int) -> dict:
        return {"name": name, "system": system, "env": "main", "length": 4096, "score": 100 * hits / 30,
                "kv_bytes": kv, "kv_bytes_ppl": kv, "ppl": 30.0, "peak_rss_bytes": 1e8, "ttft_s": 1.0,
                "predictions": {}, "versions": {}, "sample_scores": {f"p{i}": float(i < hits) for i in range(30)}}

    write_report([row("kvpress SnapKV 0.5", "kvpress", 2e8, 25), row("kvcomp a", "kvcomp", 2.01e8, 10),
                  row("kvcomp b", "kvcomp", 2.02e8, 24), row("kvcomp c", "kvcomp", 1e8, 30)], tmp_path, "# t\n")
    text = (tmp_path / "peers.md").read_text()
    assert "| 33.3 ± 16.0 (30) |" in text
    assert "kvcomp a − kvpress SnapKV 0.5 = -50.0 [" in text and "kvcomp worse" in text
    assert "kvcomp b − kvpress SnapKV 0.5 = -3.3 [" in text and "kvcomp indistinguishable" in text
    assert "kvcomp c −" not in text  # not at equal bytes, but at half the bytes against the best press there:
    assert "kvcomp c (0.50x the bytes) vs the best press at 190.7 MiB, kvpress SnapKV 0.5: +16.7 [" in text
    assert "kvcomp a (" not in text and "kvcomp b (" not in text  # equal bytes are not fewer bytes


def test_fidelity_objective_without_fidelity_fails_before_the_model_loads() -> None:
    from kvcomp.errors import ConfigError
    from kvcomp.experiment import build_parts

    with pytest.raises(ConfigError, match="task.fidelity=true"):
        build_parts(compose(["model=tiny_llama", "objective=[kl_full,kv_bytes]"]))
    assert build_parts(compose(["model=tiny_llama", "objective=kl_full", "task.fidelity=true"])).task.fidelity

"""``task=longbench``: subsets, truncation, chat template, scores, CLI (the loader: test_longbench_data.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose
from longbench_rows import LB, REAL, hub_zip, needs_rows, task

from kvcomp.errors import ConfigError
from kvcomp.task.longbench import score_task, score_task_e
from kvcomp.task.longbench.data import load_rows
from kvcomp.task.longbench.prompts import (
    EMPTY_INPUT_QUESTION,
    GROUPS,
    NO_CHAT_TEMPLATE,
    TASKS_E,
    build_prompt,
    dataset2maxlen,
    expand_subsets,
)
from kvcomp.task.longbench.task import middle_truncate
from kvcomp.task.prompting import encode_question

# --- subsets and prompts ----------------------------------------------------------------------------

def test_groups_expand() -> None:
    assert len(expand_subsets(["english"])) == 16 and len(expand_subsets(["core13"])) == 13
    assert len(expand_subsets(["all"])) == 21 and len(expand_subsets(["chinese"])) == 5
    assert not set(expand_subsets(["english"])) & set(GROUPS["chinese"])
    parts = ["single_doc_qa", "multi_doc_qa", "summarization", "few_shot", "synthetic", "code"]
    assert sorted(expand_subsets(parts)) == sorted(expand_subsets(["all"]))
    assert expand_subsets(["trec", "few_shot", "trec"]) == ["trec", "triviaqa", "samsum", "lsht"]
    assert expand_subsets("qasper") == ["qasper"]
    assert expand_subsets(["all"], e=True) == list(TASKS_E) and len(TASKS_E) == 13
    assert set(dataset2maxlen) == set(expand_subsets(["all"]))


@pytest.mark.parametrize("kw,needle", [
    ({"subsets": ["multinews"]}, "task.subsets=multinews is not one of.*did you mean 'multi_news'"),
    ({"subsets": []}, "task.subsets is empty"),
    ({"subsets": ["multifieldqa_zh"], "e": True}, "LongBench-E"),
    ({"subsets": ["chinese"], "e": True}, "has no LongBench-E task"),
    ({"rouge_impl": "rougeL"}, "task.rouge_impl=rougeL is not one of: rouge, rouge_score"),
    ({"max_samples": 0}, "task.max_samples=0"),
    ({"max_length": -5}, "task.max_length=-5"),
    ({"max_lenght": 5}, "did you mean 'max_length'"),
])
def test_bad_config_fails(kw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        task(**kw)


def test_middle_truncation_keeps_first_and_last_halves() -> None:
    ids = list(range(1000))
    assert middle_truncate(ids, 10) == [0, 1, 2, 3, 4, 995, 996, 997, 998, 999]
    assert middle_truncate(ids, 7) == [0, 1, 2, 997, 998, 999]  # int(7 / 2) each side, as pred.py
    assert middle_truncate(ids, 1000) == ids and middle_truncate(ids[:5], 10) == ids[:5]


ROW = {"input": "What is it?", "context": "abc " * 300, "answers": ["x"], "length": 300, "all_classes": None}


def test_prompt_truncated_inside_chat_template(tiny) -> None:
    _, tok = tiny
    t = task(subsets=["hotpotqa"], max_length=100)
    body = tok(build_prompt("hotpotqa", ROW), add_special_tokens=False)["input_ids"]
    ids, q = t.encode(tok, "hotpotqa", ROW)
    pre = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    post = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids == pre + body[:50] + body[-50:] + post
    assert q == encode_question(tok, "What is it?")
    plain, _ = task(subsets=["hotpotqa"], max_length=100, chat=False).encode(tok, "hotpotqa", ROW)
    assert plain == body[:50] + body[-50:]


@pytest.mark.parametrize("dataset", sorted(NO_CHAT_TEMPLATE))
def test_chat_template_skipped_for_official_set(tiny, dataset: str) -> None:
    _, tok = tiny
    ids, _ = task(subsets=[dataset], max_length=10_000).encode(tok, dataset, ROW)
    assert ids == tok(build_prompt(dataset, ROW), add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") not in ids


@needs_rows
def test_samples_carry_question_and_meta(tiny) -> None:
    _, tok = tiny
    t = task(subsets=list(REAL), data_dir=str(LB), max_samples=2, max_length=300)
    samples = t.samples(tok)
    assert [s.meta["dataset"] for s in samples] == [d for d in REAL for _ in range(2)]
    rows = {d: load_rows(d, LB)[:2] for d in REAL}
    for s in samples:
        d = s.meta["dataset"]
        row = rows[d][samples.index(s) % 2]
        question = row["input"] or EMPTY_INPUT_QUESTION[d]
        assert s.question_ids == encode_question(tok, question) and s.question_ids
        assert s.answers == row["answers"] and s.meta["length"] == row["length"]
        assert s.max_new_tokens == dataset2maxlen[d] and len(s.prompt_ids) <= 300 + 40
        assert s.prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # none of the three skips it


# --- scores -----------------------------------------------------------------------------------------

def rec(dataset: str, pred: str, answers: list[str], length: int, classes=None) -> dict:
    return {"dataset": dataset, "prediction": pred, "answers": answers, "length": length, "all_classes": classes,
            "score": 0.0}


def test_aggregate_is_official_per_task_and_mean() -> None:
    recs = [rec("hotpotqa", "Paris", ["Paris"], 3000), rec("hotpotqa", "the big city", ["Big town"], 5000),
            rec("trec", "Number\nLocation", ["Number"], 9000, ["Number", "Location"]),
            rec("gov_report", "the cat sat on a mat", ["a cat sat on the mat today"], 100)]
    m = task(subsets=["hotpotqa", "trec", "gov_report"], e=False).aggregate(recs)
    hot = score_task("hotpotqa", ["Paris", "the big city"], [["Paris"], ["Big town"]])
    assert m["score_hotpotqa"] == hot and m["score_trec"] == 100.0
    assert m["score_gov_report"] == score_task("gov_report", [recs[3]["prediction"]], [recs[3]["answers"]])
    assert m["score"] == round((hot + 100.0 + m["score_gov_report"]) / 3, 2)
    me = task(subsets=["hotpotqa", "trec", "gov_report"], e=True, rouge_impl="rouge_score").aggregate(recs)
    buckets = score_task_e("hotpotqa", ["Paris", "the big city"], [["Paris"], ["Big town"]], [3000, 5000])
    assert me["score_hotpotqa_0-4k"] == buckets["0-4k"] and me["score_hotpotqa_8k+"] is None
    assert me["score_8k+"] == 100.0
    assert me["score_0-4k"] == round((buckets["0-4k"] + me["score_gov_report_0-4k"]) / 2, 2)
    assert "score_gov_report_rouge_score" in me and "score_hotpotqa_rouge_score" not in me
    assert me["score_rouge_score"] == round((hot + 100.0 + me["score_gov_report_rouge_score"]) / 3, 2)
    assert me["score"] == m["score"]  # the official score stays the rouge one


# --- end to end -------------------------------------------------------------------------------------

def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "runners.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a subprocess run
@needs_rows
def test_pipeline_through_runner_on_real_rows(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = cli(["model=tiny_llama", "task=longbench", f"task.data_dir={LB}",
             "task.subsets=[multi_news,passage_retrieval_zh]", "task.max_samples=2", "task.max_length=200",
             f"hydra.run.dir={out}"], REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "longbench" and m["n_samples"] == 4
    assert {"score", "score_multi_news", "score_passage_retrieval_zh", "ttft_s", "kv_bytes"} <= set(m)
    assert m["score"] == round((m["score_multi_news"] + m["score_passage_retrieval_zh"]) / 2, 2)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["dataset"] for p in preds] == ["multi_news"] * 2 + ["passage_retrieval_zh"] * 2
    assert all({"id", "prompt_len", "prediction", "answers", "score", "length"} <= set(p) for p in preds)
    assert all(p["prompt_len"] <= 200 + 40 for p in preds)


@needs_rows
def test_longbench_e_and_rouge_score_in_process(tmp_path: Path) -> None:
    from kvcomp.experiment import run

    hub_zip(tmp_path, tasks=("multi_news",), suffix="_e")  # v1 rows under the _e name: enough for the plumbing
    cfg = compose(["model=tiny_llama", "+experiment=longbench_english", f"task.data_dir={tmp_path}", "task.e=true",
                   "task.subsets=[multi_news]", "task.max_samples=2", "task.max_length=128",
                   "task.rouge_impl=rouge_score", "task.fidelity=true", f"task.fidelity_cache_dir={tmp_path / 'fid'}"])
    m = run(cfg)
    assert m["n_samples"] == 2 and m["experiment"] == "longbench_english"
    assert m["ci"]["kl_full"]["n"] == 2 and m["fidelity_cache_misses"] == 2  # gold summaries teacher-forced
    assert {"score_multi_news", "score_rouge_score", "score_multi_news_rouge_score", "score_0-4k",
            "score_multi_news_0-4k", "score_multi_news_8k+"} <= set(m)


@pytest.mark.slow  # a subprocess run
def test_missing_data_dir_fails_cleanly_on_cli(tmp_path: Path) -> None:
    r = cli(["+experiment=longbench_core13", "model=tiny_llama", f"task.data_dir={tmp_path}/nothing",
             f"hydra.run.dir={tmp_path}/run"], REPO)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: task.data_dir="), r.stderr
    assert f"{tmp_path}/nothing" in lines[0] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("exp", ["longbench_core13", "longbench_english"])
def test_experiments_combine_with_compressors(exp: str) -> None:
    from kvcomp.experiment import build_parts

    size = {"longbench_core13": 13, "longbench_english": 16}[exp]
    for overrides in ([f"+experiment=[prompt_guided,{exp}]"], [f"+experiment={exp}", "compressor=unified",
                                                                 "quantizer=kivi"]):
        cfg = compose(overrides)
        parts = build_parts(cfg)
        assert cfg.task.name == "longbench" and len(parts.task.datasets) == size and cfg.exp_name == exp
        assert cfg.compressor.name == "unified"
    assert compose([f"+experiment=[prompt_guided,{exp}]"]).quantizer.name == "kvquant_stream"


def test_samsum_stops_at_newline_after_first_token(tiny, tmp_path: Path) -> None:
    """pred.py generates samsum with eos_token_id=[eos, "\\n"] and min_length=prompt+1."""
    from kvcomp.engine import Engine
    from kvcomp.registry import COMPRESSORS

    model, tok = tiny
    row = {**ROW, "context": "Anna: hi Bob!\nBob: hello, how are you?\n" * 20, "dataset": "samsum", "_id": "s0"}
    (tmp_path / "samsum.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "trec.jsonl").write_text(json.dumps({**row, "dataset": "trec"}) + "\n")
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    s, other = task(subsets=["samsum", "trec"], data_dir=str(tmp_path)).samples(tok)
    assert s.stop_ids == [newline] and other.stop_ids is None
    engine = Engine(model, tok, COMPRESSORS.build({"name": "none"}, "compressor"))
    _, free = engine.generate(s.prompt_ids, 12)
    assert len(free.tokens) == 12, "pick a prompt whose free run is not cut by EOS"
    j = next(i for i in range(1, 12) if free.tokens[i] not in free.tokens[:i])  # first new token after the 1st
    # that token as a stop token: generation ends right after it, and it is not in the text
    text, gen = engine.generate(s.prompt_ids, 12, extra_stop_ids=[free.tokens[j]])
    assert gen.tokens == free.tokens[:j + 1] and text == tok.decode(free.tokens[:j], skip_special_tokens=True)
    # the free run's first token as a stop token: it cannot be the first token (min_length), another one is
    _, gen = engine.generate(s.prompt_ids, 12, extra_stop_ids=[free.tokens[0]])
    assert gen.tokens[0] != free.tokens[0] and len(gen.tokens) >= 1

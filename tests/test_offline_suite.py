"""Offline long-context tasks: needle, kv_retrieval, passage_retrieval, passage_count, offline_suite."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from kvcomp.errors import ConfigError
from kvcomp.model.tiny import byte_tokenizer
from kvcomp.registry import TASKS
from kvcomp.task.kv_retrieval import uuid_like
from kvcomp.task.offline_suite import SUBTASKS

CFGS = {
    "needle": {"name": "needle", "context_lengths": [600, 1200], "depths": [0.0, 0.5, 1.0]},
    "kv_retrieval": {"name": "kv_retrieval", "context_length": 1200, "n_samples": 3},
    "passage_retrieval": {"name": "passage_retrieval", "context_length": 1200, "n_samples": 3},
    "passage_count": {"name": "passage_count", "context_length": 1200, "n_samples": 3},
    "offline_suite": {"name": "offline_suite", "context_length": 1200, "n_samples": 2},
}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def build(name: str, **over):
    return TASKS.build({**CFGS[name], **over}, "task")


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("name", list(CFGS))
def test_deterministic_by_seed(tok, name: str) -> None:
    a, b = build(name, seed=1).samples(tok), build(name, seed=1).samples(tok)
    c = build(name, seed=2).samples(tok)
    assert [(s.prompt_ids, s.answers) for s in a] == [(s.prompt_ids, s.answers) for s in b]
    assert [s.prompt_ids for s in a] != [s.prompt_ids for s in c]
    assert len({s.id for s in a}) == len(a)


@pytest.mark.parametrize("name", list(CFGS))
def test_question_separate_and_inside_prompt_and_length(tok, name: str) -> None:
    task = build(name)
    for s in task.samples(tok):
        assert s.question_ids and contains(s.prompt_ids, s.question_ids), s.id
        target = s.meta.get("context_length", CFGS[name].get("context_length"))
        assert 0.8 * target <= len(s.prompt_ids) <= 1.1 * target, (s.id, len(s.prompt_ids))
        assert s.answers[0] in tok.decode(s.prompt_ids) or name in ("passage_count", "offline_suite"), s.id


def test_needle_grid_meta_and_score(tok) -> None:
    samples = build("needle").samples(tok)
    assert [(s.meta["context_length"], s.meta["depth"]) for s in samples] == [
        (n, d) for n in (600, 1200) for d in (0.0, 0.5, 1.0)]
    task, s = build("needle"), samples[0]
    text = tok.decode(s.prompt_ids)
    assert len(re.findall(r"special magic number for \w+ is \d{7}", text)) == 3  # needle + 2 distractors
    assert task.score(s, f"{s.answers[0]}.") == 1.0
    assert task.score(s, f"1234567, not {s.answers[0]}") == 0.0
    assert task.score(s, "") == 0.0


def test_needle_heatmap_png(tmp_path: Path) -> None:
    task = build("needle")
    records = [{"depth": d, "context_length": n, "score": float(d < 0.5)} for n in (600, 1200) for d in (0, .5, 1)]
    paths = task.artifacts(records, tmp_path)
    png = paths["needle_heatmap"]
    assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_kv_retrieval_context_and_score(tok) -> None:
    task = build("kv_retrieval")
    s = task.samples(tok)[0]
    text = tok.decode(s.prompt_ids)
    value = s.answers[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", value)
    assert text.count(value) == 1 and s.meta["n_pairs"] >= 5
    assert task.score(s, value + '".') == 1.0
    assert task.score(s, value[:-1]) == 0.0
    assert task.score(s, uuid_like(random.Random(5))) == 0.0


def test_passage_retrieval_format_and_official_score(tok) -> None:
    task = build("passage_retrieval")
    s = task.samples(tok)[0]
    text = tok.decode(s.prompt_ids)
    k = int(s.answers[0].split()[1])
    n = s.meta["n_paragraphs"]
    assert f"Here are {n} paragraphs" in text and f"Paragraph {n}: " in text and f"Paragraph {n + 1}:" not in text
    assert 1 <= k <= n
    assert task.score(s, str(k)) == 1.0  # continues "The answer is: Paragraph "
    assert task.score(s, f"{k}, or Paragraph {k % n + 1}") == 0.5  # official: share of numbers
    assert task.score(s, str(k % n + 1)) == 0.0


def test_passage_count_answer_matches_context(tok) -> None:
    task = build("passage_count")
    for s in task.samples(tok):
        text = tok.decode(s.prompt_ids).split("\n\nPlease enter")[0]
        paras = re.findall(r"Paragraph \d+: (.*)", text)
        assert len(paras) == s.meta["n_paragraphs"] and len(set(paras)) == int(s.answers[0]) >= 2
        assert len(paras) > len(set(paras))  # at least one repeat
        assert task.score(s, s.answers[0]) == 1.0
        assert task.score(s, f"{s.answers[0]} of {len(paras)}") == 0.5
        assert task.score(s, "no idea") == 0.0


def test_suite_subtasks_meta_and_aggregate(tok) -> None:
    task = build("offline_suite")
    samples = task.samples(tok)
    assert [s.meta["subtask"] for s in samples] == [n for n in SUBTASKS for _ in range(2)]
    records = [{"subtask": s.meta["subtask"], "score": task.score(s, s.answers[0] if "count" in s.id or
                                                                  "kv" in s.id else "") } for s in samples]
    m = task.aggregate(records)
    assert m["score_kv_retrieval"] == 100.0 and m["score_passage_count"] == 100.0 and m["score_needle"] == 0.0
    assert m["score"] == 40.0 and set(m) == {"score", *(f"score_{n}" for n in SUBTASKS)}
    only = build("offline_suite", subtasks=["needle"])
    assert {s.meta["subtask"] for s in only.samples(tok)} == {"needle"}


@pytest.mark.parametrize("name,over,key", [
    ("needle", {"context_lengths": []}, "task.context_lengths"),
    ("needle", {"depths": [1.5]}, "task.depths"),
    ("needle", {"n_distractors": -1}, "task.n_distractors"),
    ("kv_retrieval", {"context_length": 0}, "task.context_length"),
    ("kv_retrieval", {"depths": []}, "task.depths"),
    ("kv_retrieval", {"key_style": "guid"}, "task.key_style"),
    ("passage_retrieval", {"paragraph_tokens": 0}, "task.paragraph_tokens"),
    ("passage_count", {"n_samples": "3"}, "task.n_samples"),
    ("offline_suite", {"subtasks": ["passkey", "neddle"]}, "task.subtasks"),
    ("offline_suite", {"bogus": 1}, "task.bogus"),
])
def test_bad_config(name: str, over: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        build(name, **over)


def test_passage_count_min_unique_too_high(tok) -> None:
    with pytest.raises(ConfigError, match="task.min_unique"):
        build("passage_count", min_unique=500).samples(tok)


# --- the real model -------------------------------------------------------------------------------

#: beyond SmolLM2-135M at 1k tokens in LongBench's format (measured: 0/3 each, README "Offline suite"); a larger
#: model is needed. Their SmolLM2 test checks that the answer has the task's form instead.
HARD = {"kv_retrieval": r"[0-9a-f]{8}-[0-9a-f]{4}-",  # starts like a UUID copied from the context
        "passage_retrieval": r"\d+", "passage_count": r"\d+"}


@pytest.fixture(scope="module")
def suite_run(smollm2):
    """offline_suite at 1k tokens, 3 samples per subtask, full cache on SmolLM2: (task, samples, records)."""
    from kvcomp.engine import Engine
    from kvcomp.registry import COMPRESSORS

    model, tokenizer = smollm2
    task = TASKS.build({"name": "offline_suite", "context_length": 1000, "n_samples": 3}, "task")
    engine = Engine(model, tokenizer, COMPRESSORS.build({"name": "none"}, "compressor"))
    samples = task.samples(tokenizer)
    return task, samples, [task.run_sample(engine, s) for s in samples]


def random_answer(rng: random.Random, subtask: str) -> str:
    """What a guesser with no access to the context would answer."""
    if subtask == "kv_retrieval":
        return uuid_like(rng) + '"'
    if subtask == "passage_retrieval" or subtask == "passage_count":
        return str(rng.randint(1, 30))
    return str(rng.randint(10_000, 9_999_999))


@pytest.mark.slow
@pytest.mark.parametrize("subtask", SUBTASKS)
def test_smollm2_solves_subtask(suite_run, subtask: str) -> None:
    task, _, records = suite_run
    scores = [r["score"] for r in records if r["subtask"] == subtask]
    assert len(scores) == 3 and all(900 <= r["prompt_len"] <= 1150 for r in records if r["subtask"] == subtask)
    if subtask in HARD:
        preds = [r["prediction"] for r in records if r["subtask"] == subtask]
        assert all(re.match(HARD[subtask], p.strip()) for p in preds), preds
    else:
        assert sum(scores) >= 2, scores


@pytest.mark.slow
@pytest.mark.parametrize("subtask", SUBTASKS)
def test_random_answers_fail(suite_run, subtask: str) -> None:
    task, samples, _ = suite_run
    rng = random.Random(0)
    scores = [task.score(s, random_answer(rng, subtask)) for s in samples if s.meta["subtask"] == subtask]
    assert len(scores) == 3 and sum(scores) < 2, scores

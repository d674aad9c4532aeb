"""task=longbench_v2: official answer extraction and result.py scoring corner cases, loaders on small local
files, pred.py's truncation and template, a 0-shot and a CoT run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose

from kvcomp.errors import ConfigError
from kvcomp.model.tiny import byte_tokenizer
from kvcomp.registry import TASKS
from kvcomp.task.longbench_v2 import TEMPLATE_0SHOT, extract_answer, fill, load_rows, score_rows, truncate

TOK = byte_tokenizer()


def row(i: int, answer: str = "A", difficulty: str = "easy", length: str = "short", context: str = "") -> dict:
    return {"_id": f"id{i}", "domain": "d", "sub_domain": "s", "difficulty": difficulty, "length": length,
            "question": f" Question {i}? ", "choice_A": " alpha ", "choice_B": "beta", "choice_C": "gamma",
            "choice_D": "delta", "answer": answer, "context": context or f"  Document {i}. " * 20}


# --- extract_answer / score_rows --------------------------------------------------------------------------

@pytest.mark.parametrize("response,expected", [
    ("The correct answer is (B)", "B"),
    ("The correct answer is C.", "C"),
    ("**The correct answer is (D)**", "D"),  # asterisks removed first
    ("The correct answer is *A*", "A"),
    ("The correct answer is B\nThe correct answer is (C)", "C"),  # the parenthesised form wins
    ("The correct answer is (A)\nThe correct answer is (B)", "A"),  # the first one
    ("the correct answer is (A)", None),  # case matters
    ("The correct answer is (E)", None),
    ("The correct answer is: A", None),
    ("", None),
])
def test_extract_answer_corner_cases(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


def test_score_rows_groups_and_rounding() -> None:
    rows = [{"response": "The correct answer is (A)", "answer": "A", "difficulty": "easy", "length": "short"},
            {"response": "The correct answer is (B)", "answer": "A", "difficulty": "hard", "length": "medium"},
            {"response": "nothing", "answer": "C", "difficulty": "hard", "length": "long"}]
    assert score_rows(rows) == {"overall": 33.3, "easy": 100.0, "hard": 0.0, "short": 100.0, "medium": 0.0,
                                "long": 0.0}
    assert score_rows(rows, compensated=True)["hard"] == 12.5  # the unextractable answer counts 0.25
    only = score_rows(rows[:1])
    assert only["hard"] is None and only["medium"] is None and only["overall"] == 100.0  # empty groups
    assert score_rows([])["overall"] is None


# --- loader, truncation, prompt --------------------------------------------------------------------------

def test_loader_reads_json_list_jsonl_and_folder(tmp_path: Path) -> None:
    rows = [row(i) for i in range(3)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    jl = tmp_path / "rows.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_rows(str(tmp_path / "data.json")) == rows == load_rows(str(jl)) == load_rows(str(tmp_path))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"_id": "x"}))
    with pytest.raises(ConfigError, match="row 0 lacks difficulty"):
        load_rows(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="task.data_path=.*does not exist"):
        load_rows(str(tmp_path / "none.json"))


def test_truncation_keeps_pred_py_halves() -> None:
    ids = list(range(10))
    assert truncate(ids, 10) == ids
    assert truncate(ids, 4) == [0, 1, 8, 9]
    assert truncate(ids, 5) == [0, 1, 7, 8, 9]  # -5 // 2 == -3: one more token from the end, as pred.py


def test_samples_use_the_official_template_and_filters(tmp_path: Path) -> None:
    rows = [row(0), row(1, "B", "hard", "long"), row(2, "C", "easy", "medium", context="x" * 5000)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    t = TASKS.build({"name": "longbench_v2", "data_path": str(tmp_path), "max_length": 1000}, "task")
    s = t.samples(TOK)
    assert [x.answers for x in s] == [["A"], ["B"], ["C"]] and s[1].meta["difficulty"] == "hard"
    text = TOK.decode(s[0].prompt_ids)
    body = fill(TEMPLATE_0SHOT, rows[0])
    assert body.startswith("Please read the following text and answer the question below.\n\n<text>\nDocument 0.")
    assert "What is the correct answer to this question: Question 0?\nChoices:\n(A) alpha\n(B) beta" in body
    assert text == f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    assert len(s[2].prompt_ids) == 1000 + len(TOK.encode("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"))
    hard = TASKS.build({"name": "longbench_v2", "data_path": str(tmp_path), "difficulties": ["hard"]}, "task")
    assert [x.answers for x in hard.samples(TOK)] == [["B"]]


@pytest.mark.parametrize("cot", [False, True])
def test_runs_on_tiny_model(tmp_path: Path, cot: bool) -> None:
    from kvcomp.experiment import run

    (tmp_path / "data.json").write_text(json.dumps([row(0), row(1, "B", "hard", "long")]))
    cfg = compose(["model=tiny_llama", "task=longbench_v2", f"task.data_path={tmp_path}", "task.max_new_tokens=3",
                   "task.cot_max_new_tokens=3", f"task.cot={str(cot).lower()}"])
    m = run(cfg, tmp_path / "run")
    assert {"score", "score_easy", "score_hard", "score_short", "score_medium", "score_long"} <= set(m)
    assert m["score_medium"] is None  # no medium rows
    recs = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and ("response_cot" in recs[0]) == cot and "row" not in recs[0]

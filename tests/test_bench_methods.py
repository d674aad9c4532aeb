"""benchmarks.methods end to end on the tiny model: rows, equal-bytes calibration against any row, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.methods import eq_split, main


def test_eq_split_names_the_target_row() -> None:
    assert eq_split("snapkv@eq") == ("snapkv", "prompt_guided")
    assert eq_split("h2o@eq:prompt_guided, question=end") == ("h2o", "prompt_guided, question=end")
    assert eq_split("h2o@eq:no such row") is None
    assert eq_split("snapkv") is None


def test_methods_table_with_an_equal_bytes_row_against_question_end(tmp_path: Path) -> None:
    end = "prompt_guided, question=end"
    text = main(["--no-ttft", "--context", "300", "--samples", "2", "--calib-samples", "1", "--runs",
                 str(tmp_path / "runs"), "--out", str(tmp_path / "m.md"), "--model", "model=tiny_llama",
                 "--rows", "full_cache", "prompt_guided", end, f"snapkv@eq:{end}"])
    assert (tmp_path / "m.md").read_text() == text
    assert f"| snapkv@eq:{end} |" in text
    line = next(x for x in text.splitlines() if x.startswith(f"- at equal kv_bytes ({end}"))
    assert "within 5 %" in line and "NOT within" not in line
    assert "model=tiny_llama fp32" in text


def test_unknown_row_is_one_error() -> None:
    with pytest.raises(SystemExit, match="error: --rows nope is not one of"):
        main(["--no-ttft", "--rows", "nope", "--runs", "/nonexistent"])


def test_table_without_prompt_guided_compares_to_the_first_row_and_checks_fastkv(tmp_path: Path) -> None:
    """A table of the full cache and fastkv rows alone (no prompt_guided row): the between-rows table is
    against the first row after the full cache, and each fastkv row gets its goal line."""
    text = main(["--no-ttft", "--context", "300", "--samples", "2", "--runs", str(tmp_path / "runs"), "--out",
                 str(tmp_path / "m.md"), "--model", "model=tiny_llama",
                 "--rows", "full_cache", "fastkv", "fastkv, tsp_rate=0.4"])  # the earlier preset's layer 15: 30 layers
    assert "| fastkv vs | score difference" in text
    assert "| fastkv, tsp_rate=0.4 |" in text
    goals = [x for x in text.splitlines() if "(goal >= 90 %" in x]
    assert [g.split("] ")[1].split(":")[0] for g in goals] == ["fastkv", "fastkv, tsp_rate=0.4"]


def test_propagation_trace_finds_the_answer_and_where_it_was_lost() -> None:
    from benchmarks.propagation_trace import answer_span, summary

    class Chars:  # one character per token id
        def decode(self, ids: list[int]) -> str:
            return "".join(chr(i) for i in ids)

    ids = [ord(c) for c in "key 4711 end"]
    assert answer_span(Chars(), ids, "4711") == [4, 5, 6, 7]
    assert answer_span(Chars(), ids, "999") == []
    rows = [{"id": "needle-0", "score": 0.0, "span": [4, 5], "points": [0, 9], "survive": [1, 1]},
            {"id": "needle-1", "score": 1.0, "span": [4, 5], "points": [0, 9], "survive": [2, 0]},
            {"id": "needle-2", "score": 0.0, "span": [4, 5], "points": [0, 9], "survive": [2, 2]}]
    assert summary(rows) == ("needle: score 33.3 (n = 3); answer not carried whole in 2 (first lost after layer: "
                             "{0: 1, 9: 1}), of which wrong 1; wrong with the answer carried whole 1")

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

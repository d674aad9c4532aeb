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

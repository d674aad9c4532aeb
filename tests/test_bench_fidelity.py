"""benchmarks.fidelity end to end on the tiny model: the goal rows alone write the table and name what did not run."""

from __future__ import annotations

from pathlib import Path

from benchmarks.fidelity import main


def test_fidelity_table_from_the_goal_rows(tmp_path: Path) -> None:
    args = ["--model", "model=tiny_llama", "--windows", "3", "--context", "64", "--continuation", "4",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "f.md")]
    assert main([*args, "--rows", "full_cache", "int8"]) == ""  # too few rows for the goals: no table
    text = main([*args, "--rows", "full_cache", "int8", "kvquant_stream"])
    assert text == (tmp_path / "f.md").read_text()
    assert "- not run: kivi" in text and "| kvquant_stream |" in text and "kl_full of int8" in text

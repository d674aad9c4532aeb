"""benchmarks.fidelity end to end on the tiny model: rows from full_cache on, in order, write the table (the goal lines
with int8 and kvquant_stream) and name what did not run."""

from __future__ import annotations

from pathlib import Path

from benchmarks.fidelity import main


def test_fidelity_table_from_the_goal_rows(tmp_path: Path) -> None:
    args = ["--model", "model=tiny_llama", "--windows", "3", "--context", "64", "--continuation", "4",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "f.md")]
    assert main([*args, "--rows", "int8", "full_cache"]) == ""  # each row is paired with the one before it
    text = main([*args, "--rows", "full_cache", "int8", "kvquant_stream"])
    assert text == (tmp_path / "f.md").read_text()
    assert "- not run: kivi" in text and "| kvquant_stream |" in text and "kl_full of int8" in text
    text = main([*args, "--rows", "full_cache", "kvquant_stream", "kvquant_stream, chunk 1024"])  # runs reused
    assert "| kvquant_stream, chunk 1024 |" in text and "kl_full of int8" not in text

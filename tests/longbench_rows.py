"""Shared by the LongBench task tests: the real LongBench rows shipped in ../shared/data, a skip mark when they are
missing, a task builder and a hub-layout zip made from the rows."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from conftest import SHARED

from kvcomp.registry import TASKS

LB = SHARED / "longbench"
REAL = ("multi_news", "multifieldqa_zh", "passage_retrieval_zh")
needs_rows = pytest.mark.skipif(not all((LB / f"{t}.jsonl").is_file() for t in REAL),
                                reason=f"LongBench sample rows not in {LB}")


def task(**kw):
    return TASKS.build({"name": "longbench", **kw}, "task")


def hub_zip(tmp_path: Path, tasks=REAL, suffix: str = "") -> Path:
    """A zip in the hub's layout (data/<task>.jsonl) built from the real rows."""
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for t in tasks:
            zf.write(LB / f"{t}.jsonl", f"data/{t}{suffix}.jsonl")
    return path

"""Scale benchmark smoke run (``--smoke``: tiny random LLaMA on CPU, 256 tokens, 4 decode tokens).

Four fresh worker processes (~35 s on 2 busy cores), hence ``slow``. kvpress / HF QuantizedCache rows run only
where those packages import; without them the report must say they were skipped.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import REPO

KVCOMP_ROWS = {"full cache", "kvquant_stream", "livekvquant", "prompt_guided"}


@pytest.mark.slow
def test_scale_smoke(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.scale", "--smoke", "--out-dir", str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "scale.md").read_text()
    rows = list(csv.DictReader((tmp_path / "scale.csv").open()))
    names = {r["name"] for r in rows}
    assert KVCOMP_ROWS <= names
    assert all(r["status"] == "ok" and not r["error"] for r in rows), [(r["name"], r["error"]) for r in rows]
    assert all(r["tokens"] == "256" and float(r["ttft_s"]) > 0 and float(r["decode_ms"]) > 0 for r in rows)
    assert all(r["peak_prefill_bytes"] == "" for r in rows)  # CUDA memory: None on CPU
    kv = {r["name"]: int(r["kv_bytes"]) for r in rows}
    assert kv["kvquant_stream"] < kv["full cache"]
    for name in names:
        assert f"| {name} | 256 |" in md
    assert "## Goals" in md and "NOT MEASURED" in md
    if importlib.util.find_spec("kvpress") is None:
        assert "skipped: kvpress SnapKV" in md

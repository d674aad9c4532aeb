"""Peer benchmark smoke run (``PEERS_SMOKE=1``: tiny model, one sample, one ratio); needs ``.venv-peers``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from conftest import REPO

PEERS = REPO / ".venv-peers" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not PEERS.exists(), reason="no .venv-peers (make peers builds it)")
def test_peers_smoke(tmp_path) -> None:
    env = {**os.environ, "PEERS_SMOKE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.peers", "--out-dir", str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "peers.csv").open()))
    assert len(rows) == 20, [r["name"] for r in rows]  # rows_for([0.5]): 16, the three h2o rows, kvcomp int4
    assert not [(r["name"], r["error"]) for r in rows if r["error"]]
    assert {r["system"] for r in rows} == {"full", "kvpress", "kvpress+quant", "hf-quantized", "kvcomp"}
    full = {r["env"]: r for r in rows if r["system"] == "full"}
    assert full["peers"]["ppl"] == full["main"]["ppl"]  # same model, same ids, two transformers versions
    text = (tmp_path / "peers.md").read_text()
    assert "predictions identical in both environments" in text
    assert (tmp_path / "peers.png").stat().st_size > 10_000
    kv = {r["name"]: float(r["kv_bytes"]) for r in rows}
    assert kv["HF QuantizedCache quanto int2"] < kv["HF QuantizedCache quanto int4"] < kv["full cache (peers env)"]
    for name in ("kvcomp snapkv 0.5 question=oracle", "kvcomp snapkv 0.5 question=end"):  # keep calibrated
        assert abs(kv[name] / kv["kvpress SnapKV 0.5"] - 1) <= 0.05, (name, kv[name], kv["kvpress SnapKV 0.5"])

"""End to end on the real embedded model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose

from kvcomp.experiment import run

pytestmark = pytest.mark.slow


def test_demo_compresses_and_both_solve_passkey(tmp_path: Path) -> None:
    """make demo's experiment: kvquant_stream and the full cache on the same 3 passkey prompts (~600 tokens):
    both score 100, and the compressed cache saves more than 70 % of fp16's bytes."""
    m = run(compose(["+experiment=demo"]), tmp_path)
    assert m["score"] == 100.0 and m["baseline_score"] == 100.0 and m["n_samples"] == 3
    assert m["memory_savings"] > 0.7 and m["baseline_kv_bytes"] > 7 * m["kv_bytes"]  # fp32 full cache
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(550 <= p["prompt_len"] <= 650 for p in preds)


def test_wikitext2_full_cache_ppl_matches_reference() -> None:
    """64 non-overlapping 1024-token windows of the file as is: 24.92 measured with a plain DynamicCache."""
    m = run(compose(["task=wikitext2_ppl", "objective=ppl"]))
    assert m["n_tokens"] == 64 * 1023
    assert m["ppl"] == pytest.approx(24.92, abs=0.01)

"""``python -m runners.report``: the table, the figures, partial sweeps, Optuna studies and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO


def fake_run(d: Path, chunk: int, ctx: int, metrics: dict | None = None, failed: str | None = None) -> None:
    (d / ".hydra").mkdir(parents=True)
    cfg = {"exp_name": "abl", "seed": 0, "compressor": {"name": "unified", "chunk_size": chunk},
           "task": {"name": "passkey", "context_length": ctx}, "model": {"name": "tiny_llama"}}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if failed:
        (d / "failed.json").write_text(json.dumps({"error": failed}))


def metrics(score: float, kv: float, bits: float) -> dict:
    layers = [{"layer": i, "avg_key_bits": bits, "avg_value_bits": bits + i, "kv_bytes": kv / 4, "tokens_held": 9}
              for i in range(4)]
    return {"task": "passkey", "score": score, "objective": score, "kv_bytes": kv, "kv_bytes_fp16": 4000.0,
            "memory_savings": 1 - kv / 4000, "per_layer": layers}


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "abl" / "2026-01-01_00-00-00"
    fake_run(root / "0", 64, 200, metrics(100.0, 1000.0, 4.0))
    fake_run(root / "1", 128, 200, metrics(50.0, 500.0, 2.0))
    fake_run(root / "2", 64, 300, metrics(40.0, 2000.0, 8.0))
    fake_run(root / "3", 128, 300, failed="ConfigError: boom")
    fake_run(root / "10", 128, 400)  # killed: no metrics.json, no failed.json
    fake_run(root / "11", 64, 400)  # interrupted (SIGTERM/Ctrl-C): status.json, no metrics.json
    status = {"status": "interrupted", "signal": "SIGTERM", "stage": "abl", "samples_done": 2, "samples_total": 5}
    (root / "11" / "status.json").write_text(json.dumps(status))
    return root


def test_report_table_and_pngs(sweep: Path) -> None:
    from runners.report import main

    assert main([str(sweep)]) == 0
    out = sweep / "report"
    md = (out / "report.md").read_text()
    assert "6 runs: 3 ok, 1 failed, 2 incomplete" in md and "ConfigError: boom" in md
    assert "interrupted (SIGTERM) after 2 of 5 samples" in md
    rows = (out / "runs.csv").read_text().splitlines()
    assert rows[0].startswith("run,status,compressor.chunk_size,task.context_length,score")
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3", "10", "11"]  # numeric order
    for png in ("pareto.png", "ablation.png", "layer_bits.png"):
        assert (out / png).stat().st_size > 1000, png


def test_pareto_front() -> None:
    from kvcomp.sweep.plots import pareto_front

    pts = [(1000.0, 100.0), (500.0, 50.0), (2000.0, 40.0), (700.0, 50.0), (400.0, 10.0)]
    assert pareto_front(pts) == [(400.0, 10.0), (500.0, 50.0), (1000.0, 100.0)]


def test_report_of_a_study_has_sampler_comparison(sweep: Path) -> None:
    import optuna

    from kvcomp.sweep.study import RUN_DIR
    from runners.report import make_report

    storage = f"sqlite:///{sweep / 'optuna.db'}"
    for name, vals in (("s-random", [1.0, 3.0, 2.0]), ("s-tpe", [2.0, 2.5, 4.0])):
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        for i, v in enumerate(vals):
            t = study.ask()
            t.suggest_float("x", 0, 1)
            study._storage.set_trial_system_attr(t._trial_id, RUN_DIR, str(i))
            study.tell(t, v)
    written = make_report(sweep, sweep / "rep")
    assert written["comparison.png"].stat().st_size > 1000
    table = (sweep / "rep" / "comparison.md").read_text()
    assert "| s-random | 3 | 3 | 1 |" in table and "| s-tpe | 3 | 4 | 2 |" in table
    assert "study,trial,state" in (sweep / "rep" / "runs.csv").read_text().splitlines()[0]
    assert f"`python -m runners.dashboard {sweep}`" in written["report.md"].read_text()  # the live view's link


def test_single_run_dir(sweep: Path) -> None:
    from runners.report import make_report

    written = make_report(sweep / "0", sweep / "0" / "report")
    assert "pareto.png" in written and "1 runs: 1 ok" in written["report.md"].read_text()


@pytest.mark.slow  # a subprocess run
def test_bad_dir_is_one_error_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for target in (tmp_path / "nosuch", tmp_path):
        r = subprocess.run([sys.executable, "-m", "runners.report", str(target)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def test_report_shows_intervals_and_paired_difference_to_best(tmp_path: Path) -> None:
    """``value ± half-width (n)`` cells, ``*`` on a significant difference to the full cache, and each run's
    paired score difference to the best run over the same samples (predictions.jsonl)."""
    from kvcomp.stats import paired_vs_baseline, run_intervals
    from runners.report import main

    root = tmp_path / "sw"
    full = [{"id": f"s{i}", "score": 1.0, "kl_full": 0.0} for i in range(40)]
    for name, hits in (("0", 40), ("1", 38), ("2", 20)):
        recs = [{"id": f"s{i}", "score": float(i < hits), "kl_full": 0.01 * (40 - hits) + 0.001 * i}
                for i in range(40)]
        m = {**metrics(100.0 * hits / 40, 1000.0, 4.0), **run_intervals(recs), **paired_vs_baseline(recs, full)}
        fake_run(root / name, 64 * (1 + int(name)), 200, m)
        (root / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main([str(root)]) == 0
    md = (root / "report" / "report.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "100.0 ± 4.4 (40)" in rows["0"] and "50.0 ± 14.8 (40) *" in rows["2"]
    assert "| best |" in rows["0"] and rows["2"].rstrip(" |").endswith("*") and "(40)" in rows["1"]
    csv_head = (root / "report" / "runs.csv").read_text().splitlines()[0]
    assert "score_low" in csv_head and "kl_full_high" in csv_head and "score_vs_best" in csv_head

"""Collect run dirs (a single run, a multirun, a resumed or partial sweep) into one table.

Every directory holding ``.hydra/config.yaml`` is a run: ``ok`` with ``metrics.json``, ``failed`` with
``failed.json``, ``incomplete`` otherwise (killed, or stopped by a signal: its ``status.json`` goes in
``error``). Columns: the config keys whose values differ between
runs, then the metrics. A study in the sweep dir (``optuna.db``, ``optuna.journal`` or the storage its
``multirun.yaml`` names) adds each run's study, trial number and state.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from kvcomp.interrupt import describe

METRICS = ("score", "kl_full", "top1_agree", "answer_nll", "objective", "kv_bytes", "kv_bytes_fp16",
           "compression_ratio", "memory_savings",
           "avg_key_bits", "avg_value_bits", "tokens_held", "tokens_dropped", "outlier_ratio", "ppl",
           "quality_retention", "ttft_s", "ttft_speedup", "tokens_per_s", "peak_rss_bytes", "n_samples",
           "fidelity_cache_hits", "fidelity_cache_misses")
#: metrics shown as ``value ± half-width (n)`` in report.md when the run has their interval (metrics["ci"])
CI_METRICS = ("score", "kl_full", "top1_agree", "answer_nll")
SKIP_KEYS = ("hydra", "model.random", "logger")


@dataclass
class Run:
    path: Path
    name: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    trial: dict[str, Any] = field(default_factory=dict)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become strings."""
    if not isinstance(d, dict):
        return {prefix: json.dumps(d) if isinstance(d, list) else d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def collect(root: str | Path, progress: bool = True) -> list[Run]:
    """Every run dir under ``root`` (or ``root`` itself), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory (pass a run dir or a multirun/sweep dir)")
    dirs = sorted({p.parent.parent for p in root.rglob(".hydra/config.yaml")}, key=_sort_key)
    runs = []
    for d in tqdm(dirs, desc="runs", unit="run", disable=not progress or len(dirs) < 50):
        cfg = yaml.safe_load((d / ".hydra" / "config.yaml").read_text()) or {}
        name = d.relative_to(root).as_posix() if d != root else d.name
        run = Run(d, name, "incomplete", flatten(cfg))
        if (d / "metrics.json").exists():
            run.status, run.metrics = "ok", json.loads((d / "metrics.json").read_text())
        elif (d / "failed.json").exists():
            run.status, run.error = "failed", json.loads((d / "failed.json").read_text()).get("error", "")
        else:  # killed, or stopped by a signal (status.json says so and how far it got)
            run.error = describe(d)
        runs.append(run)
    _attach_trials(root, runs)
    return runs


def _sort_key(p: Path) -> tuple:
    return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in p.parts)


def _attach_trials(root: Path, runs: list[Run]) -> None:
    """Study name, trial number and state from the sweep dir's storage, matched on each trial's run dir."""
    from kvcomp.sweep.storage import of_sweep_dir
    from kvcomp.sweep.study import RUN_DIR

    spec = of_sweep_dir(root)
    if spec is None:
        return
    by_dir = {r.name: r for r in runs}
    for name, trials in load_studies(spec).items():
        for t in trials:
            run = by_dir.get(str(t.system_attrs.get(RUN_DIR)))
            if run is not None:
                run.trial = {"study": name, "trial": t.number, "state": t.state.name}


def load_studies(storage: Any) -> dict[str, list[Any]]:
    """``{study name: trials}`` of every study in ``storage`` (a resolved spec or an Optuna storage)."""
    import optuna

    from kvcomp.sweep.storage import as_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = as_storage(storage)
    return {name: optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            for name in optuna.get_all_study_names(storage=storage)}


def table(runs: list[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns (run, status, trial info, differing config keys, metrics) and one row per run."""
    keys = sorted({k for r in runs for k in r.config if not k.startswith(SKIP_KEYS)})
    diff = [k for k in keys if len({json.dumps(r.config.get(k), default=str) for r in runs}) > 1]
    metric_cols = [m for m in METRICS if any(m in r.metrics for r in runs)]
    trial_cols = ["study", "trial", "state"] if any(r.trial for r in runs) else []
    ci_cols = [f"{m}_{e}" for m in CI_METRICS if any(m in r.metrics.get("ci", {}) for r in runs)
               for e in ("low", "high", "n")]
    vs = ["score_vs_best"] if sum(r.status == "ok" and "score" in r.metrics.get("ci", {}) for r in runs) > 1 else []
    cols = ["run", "status", *trial_cols, *diff, *metric_cols, *ci_cols, *vs, "error"]
    rows = []
    for r in runs:
        row = {"run": r.name, "status": r.status, **r.trial, **{k: r.config.get(k) for k in diff}, "error": r.error}
        for m in metric_cols:
            v = r.metrics.get(m)
            row[m] = json.dumps(v) if isinstance(v, list) else v
        row["_cells"] = _ci_cells(r.metrics)
        for c in ci_cols:
            m, _, e = c.rpartition("_")
            row[c] = r.metrics.get("ci", {}).get(m, {}).get("low" if e == "low" else "high" if e == "high" else "n")
        rows.append(row)
    if vs:
        _vs_best(runs, rows)
    return cols, rows


def _ci_cells(m: dict[str, Any]) -> dict[str, str]:
    """report.md cells: ``value ± half-width (n)``, ``*`` when the paired difference to the full cache
    (``compare_baseline=true``) excludes 0."""
    from kvcomp.stats import fmt

    cells = {}
    for k in CI_METRICS:
        iv = m.get("ci", {}).get(k)
        if iv:
            sig = m.get("diff_vs_baseline", {}).get(k, {}).get("significant")
            cells[k] = fmt(iv, ".4g" if k != "score" else ".1f") + (" *" if sig else "")
    return cells


def _vs_best(runs: list[Run], rows: list[dict[str, Any]]) -> None:
    """``score_vs_best``: each run's paired score difference (points) to the best-scoring run, over the samples
    both ran (matched by id in predictions.jsonl), with its 95 % interval; ``*`` when it excludes 0."""
    from kvcomp.stats import paired

    def preds(r: Run) -> dict[str, float]:
        p = r.path / "predictions.jsonl"
        if not p.exists():
            return {}
        recs = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
        return {str(x["id"]): x["score"] for x in recs if x.get("score") is not None}

    ok = [(r, row) for r, row in zip(runs, rows) if r.status == "ok" and "score" in r.metrics]
    best, _ = max(ok, key=lambda t: t[0].metrics["score"])
    bp = preds(best)
    for r, row in ok:
        if r is best:
            row["score_vs_best"] = "best"
            continue
        mine = preds(r)
        ids = [i for i in mine if i in bp]
        if not ids:
            continue
        d = paired([mine[i] for i in ids], [bp[i] for i in ids], scale=100.0)
        row["score_vs_best"] = (f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] ({d['n']})"
                                + (" *" if d["significant"] else ""))


def _md(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|").replace("\n", " ")[:80]


def markdown(cols: list[str], rows: list[dict[str, Any]]) -> str:
    """Markdown table; metrics with an interval show ``value ± half-width (n)`` (their _low/_high/_n columns,
    kept in runs.csv, are left out here)."""
    shown = [c for c in cols if not (c.rpartition("_")[2] in ("low", "high", "n") and c.rpartition("_")[0]
                                      in CI_METRICS)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(r.get("_cells", {}).get(c) or _md(r.get(c)) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, cols: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def best_so_far(trials: list[Any], maximize: bool) -> list[tuple[int, float, float]]:
    """``(trial number, value, best value so far)`` over the COMPLETE trials of a single-objective study."""
    out: list[tuple[int, float, float]] = []
    best = None
    for t in sorted(trials, key=lambda t: t.number):
        if t.state.name != "COMPLETE" or t.values is None or len(t.values) != 1:
            continue
        v = float(t.values[0])
        best = v if best is None else (max(best, v) if maximize else min(best, v))
        out.append((t.number, v, best))
    return out


def comparison(storage: Any, studies: dict[str, str]) -> dict[str, list[tuple[int, float, float]]]:
    """``{label: best_so_far}`` for each single-objective study ``{label: study name}`` in ``storage``."""
    import optuna

    from kvcomp.sweep.storage import as_storage

    storage = as_storage(storage)
    out = {}
    for label, name in studies.items():
        study = optuna.load_study(study_name=name, storage=storage)
        if len(study.directions) == 1:
            maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
            out[label] = best_so_far(study.get_trials(deepcopy=False), maximize)
    return out


def write_comparison(storage: Any, studies: dict[str, str], out_dir: str | Path) -> list[Path]:
    """``comparison.csv`` (every trial), ``comparison.md`` (one row per sampler) and ``comparison.png``."""
    from kvcomp.sweep.plots import plot_comparison

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = comparison(storage, studies)
    rows = [{"sampler": k, "trial": n, "value": v, "best_so_far": b} for k, c in curves.items() for n, v, b in c]
    write_csv(out_dir / "comparison.csv", ["sampler", "trial", "value", "best_so_far"], rows)
    summary = [{"sampler": k, "complete_trials": len(c), "best_value": c[-1][2] if c else None,
                "best_at_trial": next((n for n, _, b in c if c and b == c[-1][2]), None)}
               for k, c in curves.items()]
    cols = ["sampler", "complete_trials", "best_value", "best_at_trial"]
    (out_dir / "comparison.md").write_text(markdown(cols, summary), encoding="utf-8")
    paths = [out_dir / "comparison.csv", out_dir / "comparison.md"]
    if plot_comparison(curves, out_dir / "comparison.png"):
        paths.append(out_dir / "comparison.png")
    return paths

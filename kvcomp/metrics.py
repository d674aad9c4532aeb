"""A run's metrics: per-sample records aggregated, the sweep objective, and the files a run dir holds."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from kvcomp.errors import ConfigError
from kvcomp.stats import run_intervals

MEAN_KEYS = ("ttft_s", "decode_s", "tokens_per_s", "avg_rss_bytes", "kv_bytes", "kv_bytes_fp16",
             "avg_key_bits", "avg_value_bits", "outlier_ratio", "tokens_held", "tokens_dropped",
             "compression_ratio_key", "compression_ratio_value", "sink_tokens")
MAX_KEYS = ("peak_rss_bytes", "cuda_max_allocated_bytes")


def aggregate(task: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Task metrics + performance/cache metrics over samples (means; peaks are maxima)."""
    m: dict[str, Any] = {"n_samples": len(records)}
    m.update(task.aggregate(records))
    m.update(run_intervals(records))  # n and a 95 % interval for score and the fidelity metrics
    for k in MEAN_KEYS:
        vals = [r[k] for r in records if r.get(k) is not None]
        if vals:
            m[k] = statistics.fmean(vals)
    for k in MAX_KEYS:
        vals = [r[k] for r in records if r.get(k) is not None]
        if vals:
            m[k] = max(vals)
    if m.get("kv_bytes"):
        m["compression_ratio"] = m["kv_bytes_fp16"] / m["kv_bytes"]
        m["memory_savings"] = 1.0 - m["kv_bytes"] / m["kv_bytes_fp16"]
        m["overall_memory_savings"] = m["memory_savings"]
    layers = [r["per_layer"] for r in records if r.get("per_layer")]
    if layers:
        m["per_layer"] = [
            {k: statistics.fmean(s[i][k] for s in layers) for k in ("avg_key_bits", "avg_value_bits",
                                                                     "tokens_held", "kv_bytes")}
            | {"layer": i}
            for i in range(len(layers[0]))
        ]
    return m


def objective(metrics: dict[str, Any], spec: Any, budget_kv_bytes: float | None = None) -> float | list[float]:
    """The value(s) a sweeper optimises, from ``objective=``:

    - a metric name (``score``, ``ppl``, ``kv_bytes``...): that metric;
    - ``score_under_budget`` (needs ``budget_kv_bytes``): ``score`` while ``kv_bytes`` fits the budget,
      else ``-100 * (kv_bytes / budget - 1)`` (below any feasible score, worse the further over);
    - a list (``objective=[score,kv_bytes]``): one value per name, for multi-objective sweeps.
    """
    if isinstance(spec, list | tuple):
        if not spec:
            raise ConfigError("objective=[] names no metric; e.g. objective=[score,kv_bytes]")
        return [objective(metrics, s, budget_kv_bytes) for s in spec]  # type: ignore[misc]
    spec = str(spec)
    if spec == "score_under_budget":
        if budget_kv_bytes is None or float(budget_kv_bytes) <= 0:
            raise ConfigError("objective=score_under_budget needs budget_kv_bytes=<bytes> (a positive number)")
        kv, score = objective(metrics, "kv_bytes"), objective(metrics, "score")
        return score if kv <= float(budget_kv_bytes) else -100.0 * (kv / float(budget_kv_bytes) - 1.0)
    if spec not in metrics or not isinstance(metrics[spec], int | float):
        raise ConfigError(f"objective={spec} is not a numeric metric of this run; choose from: "
                          + ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, int | float)))
                          + ", score_under_budget, or a list of them")
    return float(metrics[spec])


def write_outputs(out: Path, metrics: dict[str, Any], records: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """predictions.jsonl and env.json first, metrics.json last; each written to a temp file and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "predictions.jsonl", "".join(json.dumps(_slim(r), ensure_ascii=False) + "\n" for r in records))
    _atomic(out / "env.json", json.dumps(env, indent=2))
    _atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=float))


def _slim(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != "per_layer"}


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

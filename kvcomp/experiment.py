"""``run(cfg) -> dict``: one experiment (model x compressor x task), independent of Hydra's CLI.

Every component is built (and its keys checked) before the model loads, so a bad config fails fast.
With ``output_dir`` the run writes ``metrics.json`` (last, atomically: its presence means the run
finished), ``predictions.jsonl`` and ``env.json``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kvcomp import interrupt
from kvcomp.engine import Engine
from kvcomp.envinfo import env_info
from kvcomp.errors import ConfigError
from kvcomp.fields import bind
from kvcomp.model import ModelConfig, load_model
from kvcomp.preflight import check_context, check_settings
from kvcomp.registry import COMPRESSORS, LOGGERS, PROPAGATORS, QUANTIZERS, SCORERS, TASKS
from kvcomp.stats import FIDELITY_KEYS, paired_vs_baseline, run_intervals

log = logging.getLogger(__name__)
MEAN_KEYS = ("ttft_s", "decode_s", "tokens_per_s", "avg_rss_bytes", "kv_bytes", "kv_bytes_fp16",
             "avg_key_bits", "avg_value_bits", "outlier_ratio", "tokens_held", "tokens_dropped",
             "compression_ratio_key", "compression_ratio_value", "sink_tokens")
MAX_KEYS = ("peak_rss_bytes", "cuda_max_allocated_bytes")


@dataclass
class Parts:
    """Everything a run needs except the model, built from the config."""

    model: ModelConfig
    compressor: Any
    task: Any
    logger: Any


def to_dict(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def build_parts(cfg: DictConfig | dict[str, Any]) -> Parts:
    """Build and validate every component from the composed config (no model is loaded)."""
    c = to_dict(cfg)
    for key in ("model", "compressor", "quantizer", "propagation", "task"):
        if not isinstance(c.get(key), dict):
            raise ConfigError(f"config group '{key}' is missing; pass {key}=<option>")
    quantizer = QUANTIZERS.build(c["quantizer"], "quantizer")
    propagator = PROPAGATORS.build(c["propagation"], "propagation")
    parts: dict[str, Any] = {"quantizer": quantizer, "propagator": propagator}
    if c.get("scorer"):
        parts["scorer"] = SCORERS.build(c["scorer"], "scorer")
    cname = str(c["compressor"].get("name", ""))
    if cname == "none" and "scorer" in parts and getattr(parts["scorer"], "registry_name", "") != "none":
        raise ConfigError(f"scorer={parts['scorer'].registry_name} needs compressor=unified (compressor=none "
                          "is the plain full cache)")
    parts = {k: v for k, v in parts.items() if k in _accepts(c["compressor"])}
    compressor = COMPRESSORS.build(c["compressor"], "compressor", **parts)
    task = TASKS.build(c["task"], "task")
    spec = c.get("objective", "score")
    wanted = [str(x) for x in (spec if isinstance(spec, list | tuple) else [spec])]
    if not getattr(task, "fidelity", False) and any(w in FIDELITY_KEYS for w in wanted):
        raise ConfigError(f"objective={spec} is a fidelity metric; set task.fidelity=true (or use a "
                          "hpo/*_fidelity preset)")
    logger = LOGGERS.build(c.get("logger") or {"name": "none"}, "logger")
    return Parts(bind(ModelConfig, c["model"], "model"), compressor, task, logger)


def _accepts(ccfg: dict[str, Any]) -> set[str]:
    """Sub-component keywords the configured compressor class takes."""
    import dataclasses

    cls = COMPRESSORS.get(str(ccfg.get("name")), "compressor.name") if "name" in ccfg else None
    if cls is None or not dataclasses.is_dataclass(cls):
        return {"quantizer", "propagator"}
    return {f.name for f in dataclasses.fields(cls)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def evaluate(engine: Engine, task: Any, samples: list[Any], desc: str) -> list[dict[str, Any]]:
    """Run and score every sample (progress bar); returns predictions.jsonl records."""
    bar = tqdm(samples, desc=desc, unit="sample", leave=False, mininterval=0.1 if sys.stderr.isatty() else 15)
    log.info("%s: %d samples (SIGTERM or Ctrl-C stops after the current one, keeping those done)", desc, len(samples))
    records: list[dict[str, Any]] = []
    try:
        for s in bar:
            interrupt.check()
            records.append(task.run_sample(engine, s))
    except interrupt.Interrupted as e:
        e.records, e.total, e.stage = records, len(samples), desc
        raise
    return records


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


def run(cfg: DictConfig | dict[str, Any], output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one experiment; returns metrics (``score`` 0-100, perf and cache numbers)."""
    c = to_dict(cfg)
    check_settings(c)
    parts = build_parts(c)
    check_context(c, parts.model, parts.task)  # still before any model or data loads
    seed_everything(c.get("seed", 0))
    out = Path(output_dir) if output_dir is not None else None
    name = str(c.get("exp_name", "run"))
    model, tok = load_model(parts.model)
    parts.compressor.check(model)  # model x method refused here, as kvcomp.compress does, before any prefill
    parts.logger.start(c, out, name)
    ok, records, stop = False, [], interrupt.install()
    try:
        engine = Engine(model, tok, parts.compressor)
        samples = parts.task.samples(tok)
        records = evaluate(engine, parts.task, samples, desc=name)
        metrics = {"task": c["task"]["name"], "experiment": name, **parts.compressor.settings(),
                   **aggregate(parts.task, records)}
        if c.get("compare_baseline"):
            metrics.update(_baseline(model, tok, parts.task, samples, metrics, records))
        if parts.task.fidelity:
            metrics.update(parts.task.fidelity_stats())
            log.info("fidelity: full-cache log-probs %d hit(s), %d miss(es) in %s", metrics["fidelity_cache_hits"],
                     metrics["fidelity_cache_misses"], metrics["fidelity_cache_dir"])
        metrics["objective"] = objective(metrics, c.get("objective", "score"), c.get("budget_kv_bytes"))
        images = parts.task.artifacts(records, out) if out is not None else {}
        if out is not None:
            write_outputs(out, metrics, records, env_info(engine.device))
        parts.logger.log_metrics(metrics)
        for img_name, path in images.items():
            parts.logger.log_image(img_name, path)
        if metrics.get("per_layer"):
            parts.logger.log_table("per_layer", metrics["per_layer"])
        ok = True
        return metrics
    except interrupt.Interrupted as e:  # predictions so far + status.json; no metrics.json
        if out is not None:
            interrupt.mark(out, e, records or e.records, env_info(next(model.parameters()).device))
        raise
    finally:
        stop()
        parts.logger.finish(ok)


def _baseline(model: Any, tok: Any, task: Any, samples: list[Any], m: dict[str, Any],
              records: list[dict[str, Any]]) -> dict[str, Any]:
    """Full cache on the same samples: quality retention and TTFT speed-up, the paired difference of the
    per-sample scores (with its interval); a small table goes to the debug log (runners.run prints the
    full side-by-side table)."""
    full = COMPRESSORS.build({"name": "none"}, "compressor")
    base = evaluate(Engine(model, tok, full), task, samples, desc="baseline")
    b = aggregate(task, base)
    res = {
        **paired_vs_baseline(records, base),
        "baseline_score": b["score"],
        "quality_retention": m["score"] / b["score"] if b["score"] else None,
        "ttft_speedup": b["ttft_s"] / m["ttft_s"] if m.get("ttft_s") else None,
        "memory_savings_vs_baseline": 1 - m["kv_bytes"] / b["kv_bytes"] if b.get("kv_bytes") else None,
        "baseline_ttft_s": b.get("ttft_s"),
        "baseline_kv_bytes": b.get("kv_bytes"),
        "baseline_kv_bytes_fp16": b.get("kv_bytes_fp16"),
        "baseline_peak_rss_bytes": b.get("peak_rss_bytes"),
        "baseline_ci": b.get("ci", {}),
    }
    rows = [("score", b["score"], m["score"]), ("ttft_s", b.get("ttft_s"), m.get("ttft_s")),
            ("kv_bytes", b.get("kv_bytes"), m.get("kv_bytes")),
            ("peak_rss_bytes", b.get("peak_rss_bytes"), m.get("peak_rss_bytes"))]
    table = "\n".join(f"{k:>16} | {_fmt(x):>14} | {_fmt(y):>14}" for k, x, y in rows)
    log.debug("baseline comparison\n%16s | %14s | %14s\n%s", "metric", "full cache", "this run", table)
    return res


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


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

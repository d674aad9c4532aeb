"""``run(cfg) -> dict``: one experiment (model x compressor x task), independent of Hydra's CLI.

The flow is one way: ``plan.build_parts`` binds and checks the whole config, then the model loads, then every
sample runs, then ``metrics`` aggregates and writes the run dir. With ``output_dir`` the run writes
``metrics.json`` (last, atomically: its presence means the run finished), ``predictions.jsonl`` and ``env.json``.
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from kvcomp import interrupt
from kvcomp.engine import Engine
from kvcomp.envinfo import env_info
from kvcomp.metrics import aggregate, objective, write_outputs
from kvcomp.model import load_model
from kvcomp.plan import Parts, build_parts, to_dict
from kvcomp.registry import COMPRESSORS
from kvcomp.stats import paired_vs_baseline

__all__ = ["Parts", "build_parts", "evaluate", "run", "seed_everything", "to_dict"]
log = logging.getLogger(__name__)


def run(cfg: DictConfig | dict[str, Any], output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one experiment; returns metrics (``score`` 0-100, perf and cache numbers).

    Bind and check the whole config (``plan.build_parts``), then load the model and refuse a model x method
    pair up front, then evaluate every sample, then aggregate and write the run dir (metrics.json last)."""
    c = to_dict(cfg)
    parts = build_parts(c)  # every check: nothing loads before this returns
    seed_everything(parts.settings.seed)
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
                   **parts.task.settings(), **aggregate(parts.task, records)}
        if parts.settings.compare_baseline:
            metrics.update(_baseline(model, tok, parts.task, samples, metrics, records))
        if parts.task.fidelity:
            metrics.update(parts.task.fidelity_stats())
            log.info("fidelity: full-cache log-probs %d hit(s), %d miss(es) in %s", metrics["fidelity_cache_hits"],
                     metrics["fidelity_cache_misses"], metrics["fidelity_cache_dir"])
        metrics["objective"] = objective(metrics, parts.objective, parts.settings.budget_kv_bytes)
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
        interrupt.heed()
        if out is not None:
            interrupt.mark(out, e, records or e.records, env_info(next(model.parameters()).device))
        raise
    finally:
        stop()
        parts.logger.finish(ok)


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

"""Intervals for per-sample quality numbers (scipy, seeded: same records + seed -> same numbers).

- ``interval(values)``: the mean with a 95 % interval — Wilson for 0/1 values (exact-match rates, via
  ``scipy.stats.binomtest``), a percentile bootstrap over samples (``scipy.stats.bootstrap``) otherwise;
- ``paired(a, b)``: mean of ``a - b`` over the same samples, with a bootstrap interval of it;
- ``run_intervals(records)``: ``{"ci": {metric: {...}}}`` for a run's ``metrics.json``.

An interval is ``{"mean", "low", "high", "n", "method"}``; scores (per-sample 0..1) are reported 0-100.
A difference is called significant when its interval excludes 0, a tie otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
#: per-sample metrics that get an interval (and a paired difference against the full cache)
FIDELITY_KEYS = ("answer_nll", "kl_full", "top1_agree")
#: score-like keys stored 0..1 per sample and 0-100 in metrics.json
PERCENT_KEYS = ("score",)


def _binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0.0) | (x == 1.0)))


def interval(values: Sequence[float], seed: int = 0, scale: float = 1.0, rate: bool = True) -> dict[str, Any]:
    """Mean of ``values`` (times ``scale``) with its 95 % interval: Wilson when ``rate`` and every value is 0 or 1
    (an exact-match rate), else a percentile bootstrap over the values."""
    from scipy import stats

    x = np.asarray([float(v) for v in values if v is not None and not math.isnan(float(v))], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "method": "none"}
    mean = float(x.mean())
    if rate and _binary(x):
        ci = stats.binomtest(int(x.sum()), n).proportion_ci(confidence_level=LEVEL, method="wilson")
        low, high, method = float(ci.low), float(ci.high), "wilson"
        return {"mean": mean * scale, "low": low * scale, "high": high * scale, "n": n, "method": method}
    return _bootstrap(x, seed, scale)


def paired(a: Sequence[float], b: Sequence[float], seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """``mean(a - b)`` over pairs (both present) with a bootstrap interval over samples; ``significant`` when
    the interval excludes 0."""
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    r = _bootstrap(d, seed, scale) if d else interval([], seed)
    r["significant"] = r["n"] > 0 and not (r["low"] <= 0.0 <= r["high"])
    return r


def _bootstrap(d: Sequence[float] | np.ndarray, seed: int, scale: float) -> dict[str, Any]:
    from scipy import stats

    x = np.asarray(d, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2 or float(x.max() - x.min()) == 0.0:
        return {"mean": mean * scale, "low": mean * scale, "high": mean * scale, "n": int(x.size),
                "method": "constant"}
    res = stats.bootstrap((x,), np.mean, confidence_level=LEVEL, n_resamples=RESAMPLES, method="percentile",
                          rng=np.random.default_rng(seed))
    return {"mean": mean * scale, "low": float(res.confidence_interval.low) * scale,
            "high": float(res.confidence_interval.high) * scale, "n": int(x.size), "method": "bootstrap"}


def _groups(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records per ``subtask`` (offline_suite) or ``dataset`` (LongBench), when there is more than one group."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        g = r.get("subtask") or r.get("dataset")
        if g is not None:
            out.setdefault(str(g), []).append(r)
    return out if len(out) > 1 else {}


def run_intervals(records: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """``{"ci": {name: interval}}`` for ``score`` (0-100) and every fidelity metric present, overall and per
    subtask (``score_<subtask>``, ``kl_full_<subtask>``...), plus the fidelity means as flat metrics."""
    ci: dict[str, Any] = {}
    flat: dict[str, float] = {}
    parts = [("", records), *((f"_{g}", rs) for g, rs in _groups(records).items())]
    for suffix, rs in parts:
        for key in (*PERCENT_KEYS, *FIDELITY_KEYS):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if not vals:
                continue
            pct = key in PERCENT_KEYS
            iv = interval(vals, seed, 100.0 if pct else 1.0, rate=pct)
            ci[key + suffix] = iv
            if key in FIDELITY_KEYS:
                flat[key + suffix] = iv["mean"]
    return {**flat, "ci": ci} if ci else {}


def paired_vs_baseline(records: list[dict[str, Any]], base: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """``{"diff_vs_baseline": {name: paired interval}}``: this run minus the full cache on the same samples
    (matched by id), for ``score`` (points, 0-100) and ``answer_nll``, overall and per subtask."""
    by_id = {r["id"]: r for r in base}
    pairs = [(r, by_id[r["id"]]) for r in records if r["id"] in by_id]
    out: dict[str, Any] = {}
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {"": pairs}
    for r, b in pairs:
        g = r.get("subtask") or r.get("dataset")
        if g is not None:
            groups.setdefault(f"_{g}", []).append((r, b))
    if len(groups) == 2:  # one group only: same as overall
        groups = {"": pairs}
    for suffix, ps in groups.items():
        for key in ("score", "answer_nll"):
            if ps and all(r.get(key) is not None and b.get(key) is not None for r, b in ps):
                out[key + suffix] = paired([r[key] for r, _ in ps], [b[key] for _, b in ps], seed,
                                           100.0 if key in PERCENT_KEYS else 1.0)
    return {"diff_vs_baseline": out} if out else {}


def half_width(iv: dict[str, Any] | None) -> float | None:
    """Half the width of an interval (the ``±`` of a table cell)."""
    if not iv or iv.get("low") is None:
        return None
    return (float(iv["high"]) - float(iv["low"])) / 2.0


def fmt(iv: dict[str, Any] | None, spec: str = ".2f") -> str:
    """``value ± half-width (n)``; ``—`` without a value."""
    if not iv or iv.get("mean") is None:
        return "—"
    return f"{format(iv['mean'], spec)} ± {format(half_width(iv) or 0.0, spec)} ({iv['n']})"

"""Report figures (PNG, matplotlib Agg): Pareto front, ablation bars, per-layer bits heatmap, sampler curves.

Each function returns False (and writes nothing) when the runs hold no data for its figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (kv_bytes, score) points no other point beats on both (fewer bytes, higher score), by bytes."""
    front: list[tuple[float, float]] = []
    for kv, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or score > front[-1][1]:
            front.append((kv, score))
    return front


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> bool:
    pts = [(float(r["kv_bytes"]), float(r["score"]), r["run"]) for r in rows
           if r.get("status") == "ok" and r.get("kv_bytes") is not None and r.get("score") is not None]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, alpha=0.6, label="runs")
    front = pareto_front([(p[0], p[1]) for p in pts])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C3", marker="o", label="Pareto front")
    if len(pts) <= 20:
        for kv, score, name in pts:
            ax.annotate(name, (kv, score), fontsize=7, alpha=0.7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="kv_bytes (cache after prefill)", ylabel="score", title="score vs cache bytes")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _label(row: dict[str, Any], keys: list[str]) -> str:
    parts = [f"{k.split('.')[-1]}={row.get(k)}" for k in keys if row.get(k) is not None]
    return ", ".join(parts)[:60] or str(row["run"])


def plot_ablation(rows: list[dict[str, Any]], diff_keys: list[str], path: Path) -> bool:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("score") is not None]
    if not ok:
        return False
    labels = [_label(r, diff_keys) for r in ok]
    second = "memory_savings" if any(r.get("memory_savings") is not None for r in ok) else None
    n = 2 if second else 1
    fig, axes = plt.subplots(1, n, figsize=(5 + 4 * n, 0.9 + 0.32 * len(ok)), squeeze=False)
    for ax, key in zip(axes[0], ["score", second][:n]):
        vals = [float(r.get(key) or 0.0) for r in ok]
        ax.barh(range(len(ok)), vals, color="C0" if key == "score" else "C2")
        ax.set_yticks(range(len(ok)), labels if key == "score" else [""] * len(ok), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(key)
    axes[0][0].set_title("ablation")
    return _save(fig, path)


def plot_layer_bits(runs: list[Any], labels: list[str], path: Path) -> bool:
    """Heatmap: one row per run, one column per layer, mean of average key and value bits."""
    data = []
    names = []
    for run, label in zip(runs, labels):
        layers = run.metrics.get("per_layer") or []
        if layers:
            data.append([(float(x.get("avg_key_bits", 0)) + float(x.get("avg_value_bits", 0))) / 2 for x in layers])
            names.append(label)
    if not data:
        return False
    width = max(len(d) for d in data)
    grid = [d + [float("nan")] * (width - len(d)) for d in data]
    fig, ax = plt.subplots(figsize=(3 + 0.35 * width, 1.2 + 0.3 * len(grid)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title("average bits per layer (keys and values)")
    fig.colorbar(im, ax=ax, label="bits")
    return _save(fig, path)


def plot_comparison(curves: dict[str, list[tuple[int, float, float]]], path: Path) -> bool:
    """Best value so far vs trial number, one line per sampler (or study)."""
    curves = {k: c for k, c in curves.items() if c}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, c in curves.items():
        ax.plot([n for n, _, _ in c], [b for _, _, b in c], marker=".", label=label)
        ax.scatter([n for n, _, _ in c], [v for _, v, _ in c], s=8, alpha=0.3)
    ax.set(xlabel="trial number", ylabel="best value so far", title="sampler comparison")
    ax.legend(fontsize=8)
    return _save(fig, path)

"""Where does the full cache work on RULER? Score of SmolLM2-135M's full cache on every offline RULER task
(the 11 without SQuAD / HotpotQA) per context length, with 95 % intervals, and the tasks it solves.

    python -m benchmarks.ruler --lengths 1000 2000 4000 --samples 30    # one run dir per (length, task), resumable
    python -m benchmarks.ruler --lengths 1000 2000 --read-only           # table + plot of the rows finished so far
    python -m benchmarks.ruler --ratio-plot benchmarks/results/ruler_peers   # score vs compression ratio (peers.csv)

Each (length, task) is ``+experiment=full_cache task=ruler task.context_length=<L> task.subtasks=[<task>]
task.n_samples=<samples>``; finished rows are read back from ``--runs/L<length>-<task>``. A task is
"solved" at a length when its official score is >= ``--goal`` (90 %). Intervals: Wilson for 0/1 scores,
bootstrap for the fractional ones (multi-value tasks), from ``kvcomp.stats.interval``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import header, publish
from benchmarks.lengths import wall_min
from benchmarks.quality import run_row
from kvcomp.stats import fmt, interval
from kvcomp.task.ruler import OFFLINE_TASKS

RESULTS = Path(__file__).resolve().parent / "results"


def cell(table: dict[int, dict[str, dict[str, Any]]], n: int, t: str) -> str:
    return fmt(table[n][t]["iv"], ".1f") if t in table[n] else "not run"


def solved(table: dict[int, dict[str, dict[str, Any]]], goal: float) -> dict[int, list[str]]:
    """Length -> tasks whose official score reaches ``goal``."""
    return {n: [t for t, c in row.items() if c["score"] is not None and c["score"] >= goal] for n, row in table.items()}


def measure(lengths: list[int], tasks: list[str], samples: int, runs: Path, extra: list[str] | None = None,
            read_only: bool = False) -> tuple[dict[int, dict[str, dict[str, Any]]], float]:
    """Length -> task -> {score (official), iv (interval), n}; and the total wall minutes. ``read_only``: rows
    not finished yet are left out (no run)."""
    table: dict[int, dict[str, dict[str, Any]]] = {}
    wall = 0.0
    for length in lengths:
        table[length] = {}
        for task in tasks:
            ov = ["+experiment=full_cache", "task=ruler", f"task.context_length={length}",
                  f"task.subtasks=[{task}]", f"task.n_samples={samples}", *(extra or [])]
            name = f"L{length}-{task}"
            if read_only and not (runs / name / "metrics.json").exists():
                continue
            m, recs = run_row(name, ov, runs)
            wall += wall_min(runs / name, m)
            table[length][task] = {"score": m.get(f"score_{task}"), "n": len(recs),
                                   "iv": interval([r["score"] for r in recs], scale=100.0),
                                   "len": [r["length"] for r in recs]}
            print(f"  L{length} {task}: {m.get(f'score_{task}')} (n={len(recs)})", file=sys.stderr, flush=True)
    return table, wall


def render(table: dict[int, dict[str, dict[str, Any]]], tasks: list[str], goal: float) -> str:
    lengths = list(table)
    lines = ["| task | " + " | ".join(f"{n} tokens: % ± 95 % (n)" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(cell(table, n, t) for n in lengths) + " |")
    lines.append("| mean of the tasks run (official score) | " + " | ".join(
        f"{sum(c['score'] for c in table[n].values()) / len(table[n]):.2f} ({len(table[n])} tasks)"
        if table[n] else "—" for n in lengths) + " |")
    ok = solved(table, goal)
    out = "\n".join(lines) + "\n\n"
    for n in lengths:
        lens = [x for c in table[n].values() for x in c["len"]]
        if lens:
            out += (f"- {n} tokens: solved (>= {goal:g} %): {', '.join(ok[n]) or 'none'}; sample lengths "
                    f"{min(lens)}-{max(lens)} tokens (prompt + RULER's tokens_to_generate)\n")
    return out


def plot_tasks(table: dict[int, dict[str, dict[str, Any]]], tasks: list[str], goal: float, path: Path) -> None:
    """Bars: official score per task, one bar per length, with the 95 % interval and the goal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(table)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(tasks), 4.2))
    width = 0.8 / max(len(lengths), 1)
    for j, n in enumerate(lengths):
        xs = [i + (j - (len(lengths) - 1) / 2) * width for i, t in enumerate(tasks) if t in table[n]]
        cells = [table[n][t] for t in tasks if t in table[n]]
        ys = [c["iv"]["mean"] for c in cells]
        err = [[y - c["iv"]["low"] for y, c in zip(ys, cells)], [c["iv"]["high"] - y for y, c in zip(ys, cells)]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=f"{n} tokens")
    ax.axhline(goal, color="k", linestyle="--", linewidth=0.8, label=f"solved ({goal:g} %)")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_ylabel("official RULER score (%)")
    ax.set_ylim(0, 105)
    ax.set_title("SmolLM2-135M-Instruct, full cache")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ratio_plot(peers_dir: Path) -> Path:
    """Score vs compression ratio (1 - bytes held / the full cache's) per method, from ``peers.csv`` of a
    ``benchmarks.peers --task ruler`` run; one panel per length (the shape of kvpress's leaderboard)."""
    import csv
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader((peers_dir / "peers.csv").open()) if not r.get("error")]
    lengths = sorted({int(r["length"]) for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(9.5 * len(lengths), 4.5), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        at = [r for r in rows if int(r["length"]) == n]
        full = next(r for r in at if r["system"] == "full")
        methods: dict[str, list[tuple[float, float]]] = {}
        for r in at:
            label = "full cache" if r["system"] == "full" else re.sub(r" \d(\.\d+)?(?= |$)", "", r["name"])
            ratio = 1 - float(r["kv_bytes"]) / float(full["kv_bytes"])
            methods.setdefault(label, []).append((ratio, float(r["score"])))
        for label, pts in sorted(methods.items()):
            pts = sorted(set(pts))
            ax.plot(*zip(*pts), "o-" if label != "full cache" else "k*", label=label, alpha=0.8)
        ax.set_xlabel("compression ratio (1 - bytes held / full cache)")
        ax.set_ylabel("RULER score (%)")
        ax.set_title(f"{n} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the panel, off the points
    fig.tight_layout()
    out = peers_dir / "ruler_ratio.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--tasks", nargs="+", default=list(OFFLINE_TASKS))
    p.add_argument("--runs", type=Path, default=Path("outputs/ruler_full"))
    p.add_argument("--out", type=Path, default=RESULTS / "ruler.md")
    p.add_argument("--goal", type=float, default=90.0, help="official score (%%) that counts as solved")
    p.add_argument("--template", choices=("chat", "chat_nospace", "base"), default="chat",
                   help="task.template: how the prompt is wrapped (chat = RULER's model template for a chat model)")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. model.*)")
    p.add_argument("--read-only", action="store_true", help="only read back finished rows (nothing runs)")
    p.add_argument("--ratio-plot", type=Path, default=None, help="folder of a peers.csv: write ruler_ratio.png")
    a = p.parse_args(argv)
    if a.ratio_plot is not None:
        return str(ratio_plot(a.ratio_plot))
    torch.set_grad_enabled(False)
    table, wall = measure(a.lengths, a.tasks, a.samples, a.runs, [f"task.template={a.template}", *a.extra],
                          a.read_only)
    plot_tasks(table, a.tasks, a.goal, a.out.with_suffix(".png"))
    settings = (f"SmolLM2-135M-Instruct fp32 on CPU, sdpa, full cache unchunked, greedy; task=ruler generated "
                f"locally (seed 0), task.template={a.template}, {a.samples} samples per task and length; cells are "
                "the official RULER score with a 95 % interval (Wilson for 0/1 tasks, bootstrap otherwise); solved = "
                f"official score >= {a.goal:g} %. qa_1 / qa_2 not run (need SQuAD / HotpotQA). Wall {wall:.1f} min "
                "in all (rows read back count their own run time).")
    text = (header("RULER: where the full cache works", ["benchmarks.ruler", *(argv or sys.argv[1:])])
            + f"- settings: {settings}\n\n"
            + render(table, a.tasks, a.goal) + f"\n![scores per task]({a.out.with_suffix('.png').name})\n")
    return publish(a.out, text)


if __name__ == "__main__":
    main()

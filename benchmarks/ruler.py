"""Where does the full cache work on RULER? Score of SmolLM2-135M's full cache on every offline RULER task
(the 11 without SQuAD / HotpotQA) per context length, with 95 % intervals, and the tasks it solves.

    python -m benchmarks.ruler --lengths 1000 2000 4000 --samples 30    # one run dir per (length, task), resumable

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


def solved(table: dict[int, dict[str, dict[str, Any]]], goal: float) -> dict[int, list[str]]:
    """Length -> tasks whose official score reaches ``goal``."""
    return {n: [t for t, c in row.items() if c["score"] is not None and c["score"] >= goal] for n, row in table.items()}


def measure(lengths: list[int], tasks: list[str], samples: int, runs: Path, extra: list[str] | None = None
            ) -> tuple[dict[int, dict[str, dict[str, Any]]], float]:
    """Length -> task -> {score (official), iv (interval), n}; and the total wall minutes."""
    table: dict[int, dict[str, dict[str, Any]]] = {}
    wall = 0.0
    for length in lengths:
        table[length] = {}
        for task in tasks:
            ov = ["+experiment=full_cache", "task=ruler", f"task.context_length={length}",
                  f"task.subtasks=[{task}]", f"task.n_samples={samples}", *(extra or [])]
            name = f"L{length}-{task}"
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
        lines.append(f"| {t} | " + " | ".join(fmt(table[n][t]["iv"], ".1f") for n in lengths) + " |")
    lines.append("| mean (official score) | " + " | ".join(
        f"{sum(table[n][t]['score'] for t in tasks) / len(tasks):.2f}" for n in lengths) + " |")
    ok = solved(table, goal)
    out = "\n".join(lines) + "\n\n"
    for n in lengths:
        lens = [x for t in tasks for x in table[n][t]["len"]]
        out += (f"- {n} tokens: solved (>= {goal:g} %): {', '.join(ok[n]) or 'none'}; sample lengths "
                f"{min(lens)}-{max(lens)} tokens (prompt + RULER's tokens_to_generate)\n")
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--tasks", nargs="+", default=list(OFFLINE_TASKS))
    p.add_argument("--runs", type=Path, default=Path("outputs/ruler_full"))
    p.add_argument("--out", type=Path, default=RESULTS / "ruler.md")
    p.add_argument("--goal", type=float, default=90.0, help="official score (%%) that counts as solved")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. model.*)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    table, wall = measure(a.lengths, a.tasks, a.samples, a.runs, a.extra)
    text = (header("RULER: where the full cache works", ["benchmarks.ruler", *(argv or sys.argv[1:])])
            + f"- settings: SmolLM2-135M-Instruct fp32 on CPU, sdpa, full cache unchunked, greedy; task=ruler "
            f"generated locally (seed 0), {a.samples} samples per task and length; cells are the official "
            f"RULER score with a 95 % interval (Wilson for 0/1 tasks, bootstrap otherwise); solved = official "
            f"score >= {a.goal:g} %. qa_1 / qa_2 not run (need SQuAD / HotpotQA). Wall {wall:.1f} min in all.\n\n"
            + render(table, a.tasks, a.goal))
    return publish(a.out, text)


if __name__ == "__main__":
    main()

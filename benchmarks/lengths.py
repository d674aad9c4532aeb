"""Where does the full cache work? Exact-match rate of SmolLM2-135M's full cache on passkey and needle per
context length, with Wilson 95 % intervals, so the methods benchmark runs where the baseline solves the task.

    python -m benchmarks.lengths --lengths 1000 2000 --samples 30     # one run dir per length, resumable

Each length is ``+experiment=full_cache task=offline_suite task.subtasks=[passkey,needle]`` with ``--samples``
per subtask (depths (i+1)/(n+1)); finished lengths are read back from ``--runs/L<length>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import header, publish
from benchmarks.quality import run_row
from kvcomp.stats import fmt, interval

RESULTS = Path(__file__).resolve().parent / "results"
SUBTASKS = ("passkey", "needle")


def wall_min(run_dir: Path, m: dict[str, Any]) -> float:
    """Minutes the run took: recorded by run_row, else from the run dir's first and last file times."""
    if m.get("wall_s"):
        return m["wall_s"] / 60
    start = min(p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file())
    return ((run_dir / "metrics.json").stat().st_mtime - start) / 60


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--runs", type=Path, default=Path("outputs/baseline_lengths"))
    p.add_argument("--out", type=Path, default=RESULTS / "lengths.md")
    p.add_argument("--goal", type=float, default=95.0, help="exact-match rate (%%) the full cache must reach")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    lines = ["| tokens | " + " | ".join(f"{s} % ± 95 % (n)" for s in SUBTASKS) + " | solved ≥ goal | wall min |",
             "|---:|" + "---:|" * (len(SUBTASKS) + 2)]
    for length in a.lengths:
        ov = ["+experiment=full_cache", "task=offline_suite", f"task.context_length={length}",
              f"task.n_samples={a.samples}", f"task.subtasks=[{','.join(SUBTASKS)}]"]
        m, recs = run_row(f"L{length}", ov, a.runs)
        ivs = {s: interval([r["score"] for r in recs if r.get("subtask") == s], scale=100.0) for s in SUBTASKS}
        ok = [s for s in SUBTASKS if ivs[s]["mean"] is not None and ivs[s]["mean"] >= a.goal]
        lines.append(f"| {length} | " + " | ".join(fmt(ivs[s], ".1f") for s in SUBTASKS)
                     + f" | {', '.join(ok) or 'none'} | {wall_min(a.runs / f'L{length}', m):.1f} |")
    text = (header("Where the full cache works: passkey and needle vs context length",
                   ["benchmarks.lengths", *(argv or sys.argv[1:])])
            + f"- settings: SmolLM2-135M-Instruct fp32 on CPU, sdpa, full cache unchunked, greedy; offline_suite "
            f"passkey + needle, {a.samples} samples per subtask and length, depths (i+1)/(n+1); Wilson 95 % "
            f"intervals; goal: the full cache solves a subtask >= {a.goal:g} % of the time. Wall times: 1 thread, "
            "two lengths at a time, on 2 cores shared with other jobs (load 6-10).\n\n" + "\n".join(lines) + "\n")
    return publish(a.out, text)


if __name__ == "__main__":
    main()

"""Fidelity to the full cache on WikiText-2 continuations: does ``kl_full`` order the quantizers?

Each sample: ``--context`` WikiText-2 tokens prefilled through the method's cache, then the next
``--continuation`` tokens teacher-forced one decode step each (``task=wikitext2_ppl task.mode=continuation
task.fidelity=true``). Per row: continuation perplexity, ``kl_full`` (mean KL(full ‖ method) over those
positions), ``top1_agree``, each with n and a 95 % bootstrap interval; then the paired ``kl_full`` difference
of each row to the previous one (same windows), ``*`` when its interval excludes 0.

    python -m benchmarks.fidelity                         # 30 windows of 4096 + 32 tokens, 4 rows
    python -m benchmarks.fidelity --rows full_cache int8  # some rows (split rows over processes)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import header, publish
from benchmarks.quality import ci_cell, diff_cell, pair, run_row

RESULTS = Path(__file__).resolve().parent / "results"
#: rows in the order perplexity ranks them (README "Quantizers"): name -> (experiment, overrides)
ROWS: dict[str, tuple[str, list[str]]] = {e: (e, []) for e in ("full_cache", "int8", "kvquant_stream", "kivi")}
#: the chunk size's effect (paired against the row before it when run as ``--rows full_cache kvquant_stream ...``)
ROWS["kvquant_stream, chunk 1024"] = ("kvquant_stream", ["compressor.chunk_size=1024"])


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--continuation", type=int, default=32)
    p.add_argument("--windows", type=int, default=30)
    p.add_argument("--rows", nargs="+", default=list(ROWS), help=f"subset of: {', '.join(ROWS)}")
    p.add_argument("--runs", type=Path, default=Path("outputs/bench_fidelity"))
    p.add_argument("--fresh", action="store_true", help="rerun rows whose run dir already finished")
    p.add_argument("--model", nargs="*", default=[], help="extra overrides of every row (model=tiny_llama)")
    p.add_argument("--out", type=Path, default=RESULTS / "fidelity.md")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    t0 = time.time()
    task = ["task=wikitext2_ppl", "task.mode=continuation", f"task.seq_len={a.context}",
            f"task.continuation_tokens={a.continuation}", f"task.max_windows={a.windows}", "task.fidelity=true",
            *a.model]
    rows: dict[str, dict[str, Any]] = {}
    for name in a.rows:
        exp, extra = ROWS[name]
        m, recs = run_row(name, [f"+experiment={exp}", *task, *extra], a.runs, resume=not a.fresh)
        rows[name] = {"metrics": m, "records": recs}
        print(f"  {name:>15}: kl_full {m.get('kl_full')}  ppl {m.get('ppl'):.3f}", file=sys.stderr)
    order = [n for n in ROWS if n in rows]
    if list(rows) != order or order[0] != "full_cache" or len(rows) < 2:  # each row paired with the one before
        print(f"rows {', '.join(rows)} done in {a.runs}; rerun with full_cache first and the rows in the order "
              f"{', '.join(ROWS)} to write the table", file=sys.stderr)
        return ""
    text = render(rows, a, argv, time.time() - t0)
    return publish(a.out, text)


def render(rows: dict[str, dict[str, Any]], a: argparse.Namespace, argv: list[str] | None, wall_s: float) -> str:
    lines = ["| configuration | fp16 bytes / kv_bytes | continuation PPL | kl_full (nats) | top1_agree | "
             "kl_full − previous row [95 % CI] |", "|---|---:|---:|---:|---:|---:|"]
    names = list(rows)
    diffs = {}
    for i, name in enumerate(names):
        m = rows[name]["metrics"]
        d = pair(rows[name]["records"], rows[names[i - 1]]["records"], "kl_full") if i else {}
        diffs[name] = d
        lines.append(f"| {name} | {m['kv_bytes_fp16'] / m['kv_bytes']:.2f} | {m['ppl']:.3f} | "
                     f"{ci_cell(m, 'kl_full', '.3g')} | {ci_cell(m, 'top1_agree', '.3f')} | "
                     f"{diff_cell(d, '+.3g') if i else '—'} |")
    goals = _goals(rows, names, diffs) if {"int8", "kvquant_stream"} <= set(names) else ["- (int8 / kvquant_stream "
                                                                                          "not both run)"]
    hits = sum(r["metrics"].get("fidelity_cache_hits", 0) for r in rows.values())
    misses = sum(r["metrics"].get("fidelity_cache_misses", 0) for r in rows.values())
    walls = ", ".join(f"{k} {r['metrics'].get('wall_s', float('nan')) / 60:.1f}" for k, r in rows.items())
    settings = (f"SmolLM2-135M-Instruct fp32 on CPU, sdpa; {a.windows} WikiText-2 test windows of {a.context} context "
                f"tokens + the next {a.continuation} teacher-forced one decode step each; compressed rows prefill "
                "in their experiment's chunks; full cache unchunked. Intervals: percentile bootstrap over windows "
                "(2000 resamples, seed 0), paired over the same windows; `*` = the interval excludes 0.")
    return (header("Fidelity to the full cache on WikiText-2 continuations", ["benchmarks.fidelity",
                                                                              *(argv or sys.argv[1:])])
            + f"- settings: {settings}\n- full-cache log-probs: {hits} hit(s), {misses} miss(es); wall time per row "
            f"(min, 1 thread, 2 shared cores): {walls}; whole benchmark {wall_s / 60:.1f} min\n"
            + (f"- not run: {', '.join(n for n in ROWS if n not in rows)}\n" if len(rows) < len(ROWS) else "") + "\n"
            + "\n".join(lines) + "\n\nGoals:\n" + "\n".join(goals) + "\n")


def _goals(rows: dict[str, dict[str, Any]], names: list[str], diffs: dict[str, dict[str, Any]]) -> list[str]:
    ci = {n: rows[n]["metrics"]["ci"]["kl_full"] for n in names}
    int8, kvq = ci["int8"], ci["kvquant_stream"]
    ordered = all(diffs[n].get("significant") and diffs[n]["mean"] > 0 for n in names[1:])
    ppl_order = all(rows[names[i]]["metrics"]["ppl"] <= rows[names[i + 1]]["metrics"]["ppl"]
                    for i in range(len(names) - 1))
    return [
        f"- [{'x' if int8['mean'] < 1e-3 else ' '}] kl_full of int8 {int8['mean']:.3g} nats (goal < 1e-3)",
        f"- [{'x' if int8['high'] < kvq['low'] else ' '}] int8's interval [{int8['low']:.3g}, {int8['high']:.3g}] "
        f"excludes kvquant_stream's [{kvq['low']:.3g}, {kvq['high']:.3g}]",
        f"- [{'x' if ordered else ' '}] kl_full orders {' < '.join(names)} (each paired step significant); "
        f"continuation perplexity orders them the same way: {'yes' if ppl_order else 'no'}",
    ]


if __name__ == "__main__":
    main()

"""Prefill straight from the packed cache vs the full cache (issue 20): time, decode, memory, where time goes.

    OMP_NUM_THREADS=2 python -m benchmarks.prefill                 # 4k and 8k, median of 3, measured ALONE
    python -m benchmarks.prefill --smoke --out /tmp/prefill.md     # short lengths, 1 repeat (a dry run)

Rows: the full cache (plain DynamicCache, unchunked), full precision chunked at 512 (DynamicCache with the
model's own masked sdpa, and kvcomp's store with no quantizer: the floor of chunking itself), int4,
kvquant_stream, livekvquant, prompt_guided (80/60/40 propagation), fastkv. Every prompt is ``tokens``
WikiText-2 tokens + a question (the same ids in every row; only prompt_guided uses the question as a guide).
Columns, per length: prefill seconds (median of ``--repeats`` interleaved runs, order reversed every other
round), ratio to the full cache of the same run, decode ms/token right after that prefill (median of
``--decode`` greedy steps, then of the repeats), peak RSS above the loaded weights during one prefill (a
fresh process per row, ``benchmarks.common rss``, no question there; the longest length only unless
``--rss-all``), and for the longest length a
torch.profiler breakdown of one prefill: linear layers, attention, dequantize, quantize/pack, RoPE (kvcomp
re-applying / inverting it; the model's own RoPE is in "other"), scoring, other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO, compose, header, load, median, publish, rss_in_subprocess, table, wikitext_ids

QUESTION = "\n\nQuestion: what is the text above about? Answer:"
#: (label, experiment, extra overrides)
ROWS: list[tuple[str, str, list[str]]] = [
    ("full cache", "full_cache", []),
    ("fp chunked 512 (DynamicCache, masked sdpa)", "full_cache", ["compressor.chunk_size=512"]),
    ("fp chunked 512 (kvcomp store, split attention)", "full_cache",
     ["compressor=unified", "quantizer=none", "compressor.chunk_size=512"]),
    ("int4", "int4", []),
    ("kvquant_stream", "kvquant_stream", []),
    ("livekvquant", "livekvquant", []),
    ("prompt_guided", "prompt_guided", []),
    ("fastkv", "fastkv", []),
    ("fastkv, tsp_rate=0.4", "fastkv", ["propagation.tsp_rate=0.4"]),
    ("prompt_guided, question=end", "prompt_guided", ["compressor.question=end"]),
    ("prompt_guided_end (no propagation)", "prompt_guided_end", []),
    ("prompt_guided, schedule=chunk", "prompt_guided", ["propagation.schedule=chunk"]),
    ("fastkv, schedule=chunk (per-chunk budget, fp32 store)", "fastkv",
     ["propagation.schedule=chunk", "compressor.precision.budget_at=stream", "quantizer=none"]),
]
BOUNDARY: dict[int, int] = {}  # id(compressor) -> peak bytes of its stage boundary (last prefill)
#: rows every run keeps (the ratios' denominators)
BASE_ROWS = ("full cache", "fp chunked 512 (kvcomp store, split attention)")
SCOPES = {"attention": ("kvcomp::attend", "aten::scaled_dot_product_attention"),
          "dequantize": ("kvcomp::dequantize",), "quantize/pack": ("kvcomp::quantize",), "RoPE": ("kvcomp::rope",),
          "scoring": ("kvcomp::score",), "linear": ("aten::linear",)}


def compressor(exp: str, extra: list[str]) -> Any:
    from kvcomp.experiment import build_parts

    return build_parts(compose([f"+experiment={exp}", *extra])).compressor


@torch.inference_mode()
def run_once(model: Any, comp: Any, ids: torch.Tensor, qids: torch.Tensor, decode: int
             ) -> tuple[float, float | None]:
    """(prefill seconds, median decode ms/token over ``decode`` greedy steps right after it); a stage-schedule
    row's peak boundary bytes (``Session.stats``) go to ``BOUNDARY[id(comp)]``."""
    with comp.session(model, qids) as s:
        t0 = time.perf_counter()
        logits = s.prefill(ids)
        dt = time.perf_counter() - t0
        if s.schedule is not None:
            BOUNDARY[id(comp)] = s.schedule.boundary_bytes
        steps = []
        nxt = logits.argmax(-1)[:, None]
        for _ in range(decode):
            t1 = time.perf_counter()
            nxt = s.step(nxt).argmax(-1)[:, None]
            steps.append(1000 * (time.perf_counter() - t1))
    return dt, (statistics.median(steps) if steps else None)


@torch.inference_mode()
def profile(model: Any, comp: Any, ids: torch.Tensor, qids: torch.Tensor) -> dict[str, float]:
    """Seconds per category (``SCOPES`` + other) of one profiled prefill; scopes are inclusive, not nested."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with comp.session(model, qids) as s, tprofile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        s.prefill(ids)
        wall = time.perf_counter() - t0
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    out = {cat: sum(totals.get(k, 0.0) for k in keys) for cat, keys in SCOPES.items()}
    out["other"] = max(0.0, wall - sum(out.values()))
    out["total"] = wall
    return out


def measure(a: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    global ROWS
    if a.rows:
        unknown = [r for r in a.rows if r not in {x[0] for x in ROWS}]
        if unknown:
            raise SystemExit(f"error: --rows {unknown[0]!r} is not one of: {', '.join(x[0] for x in ROWS)}")
        ROWS = [x for x in ROWS if x[0] in BASE_ROWS or x[0] in a.rows]
    torch.set_num_threads(a.threads)
    model, tok, _ = load("full_cache")
    qids = torch.tensor([tok(QUESTION, add_special_tokens=False)["input_ids"]])
    comps = {label: compressor(exp, extra) for label, exp, extra in ROWS}
    warm = torch.cat([wikitext_ids(tok, 600), qids], dim=1)
    for comp in comps.values():
        run_once(model, comp, warm, qids, 1)
    rows: list[dict[str, Any]] = []
    prof: dict[str, dict[str, float]] = {}
    for n in a.lengths:
        ids = torch.cat([wikitext_ids(tok, n), qids], dim=1)
        times: dict[str, list[float]] = {r[0]: [] for r in ROWS}
        dec: dict[str, list[float]] = {r[0]: [] for r in ROWS}
        order = [r[0] for r in ROWS]
        for rep in range(a.repeats):
            for label in order if rep % 2 == 0 else order[::-1]:
                dt, ms = run_once(model, comps[label], ids, qids, a.decode)
                times[label].append(dt)
                if ms is not None:
                    dec[label].append(ms)
                print(f"  {n:>6} {label:>48}: prefill {dt:7.2f} s, decode {ms or 0:7.1f} ms/token", file=sys.stderr)
        full, full_dec = median(times["full cache"]), median(dec["full cache"])
        rss_here = a.rss and (a.rss_all or n == max(a.lengths))
        for label, exp, extra in ROWS:
            r = {"tokens": n, "row": label, "prefill_s": median(times[label]), "runs": times[label],
                 "decode_ms": median(dec[label]) if dec[label] else None}
            r["ratio"] = r["prefill_s"] / full
            r["decode_ratio"] = r["decode_ms"] / full_dec if r["decode_ms"] and full_dec else None
            fp = median(times["fp chunked 512 (kvcomp store, split attention)"])
            r["ratio_fp"] = r["prefill_s"] / fp
            if id(comps[label]) in BOUNDARY:
                r["boundary_mib"] = BOUNDARY.pop(id(comps[label])) / 2**20
            if rss_here:
                r["rss"] = rss_in_subprocess(exp, n, extra)["peak_above_weights"]
            rows.append(r)
        if rss_here:
            base = next(r["rss"] for r in rows if r["tokens"] == n and r["row"] == "full cache")
            for r in rows:
                if r["tokens"] == n:
                    r["rss_mib"], r["rss_ratio"] = r["rss"] / 2**20, r["rss"] / base if base else None
    if a.profile:
        n = max(a.lengths)
        ids = torch.cat([wikitext_ids(tok, n), qids], dim=1)
        for label in order:
            prof[label] = profile(model, comps[label], ids, qids)
            print(f"  profile {n} {label}: {prof[label]}", file=sys.stderr)
    return rows, prof


def goals(rows: list[dict[str, Any]]) -> list[str]:
    def get(n: int, label: str, key: str) -> float | None:
        return next((r.get(key) for r in rows if r["tokens"] == n and r["row"] == label), None)

    out = []

    def check(text: str, value: float | None, limit: float) -> None:
        if value is None:
            out.append(f"- [ ] {text}: not measured")
        else:
            out.append(f"- [{'x' if value <= limit else ' '}] {text} ≤ {limit}x: measured {value:.2f}x "
                       f"({'met' if value <= limit else 'NOT met'})")

    for n in sorted({r["tokens"] for r in rows}):
        check(f"{n}: kvquant_stream chunked prefill vs full cache", get(n, "kvquant_stream", "ratio"), 1.05)
    top = max(r["tokens"] for r in rows)
    check(f"{top}: prompt_guided prefill (TTFT without the first token) vs full", get(top, "prompt_guided", "ratio"),
          0.75)
    check(f"{top}: fastkv prefill vs full", get(top, "fastkv", "ratio"), 0.55)
    check(f"{top}: kvquant_stream decode ms/token vs full", get(top, "kvquant_stream", "decode_ratio"), 1.0)
    check(f"{top}: kvquant_stream peak RSS above weights vs full", get(top, "kvquant_stream", "rss_ratio"), 0.20)
    return out


def render(a: argparse.Namespace, rows: list[dict[str, Any]], prof: dict[str, dict[str, float]],
           argv: list[str]) -> str:
    for r in rows:
        r["each"] = " ".join(f"{x:.2f}" for x in r["runs"])
    cols = [("tokens", "tokens", ""), ("row", "row", ""), ("prefill_s", "prefill s (median)", ".2f"),
            ("ratio", "vs full", ".2f"), ("ratio_fp", "vs fp chunked kvcomp", ".2f"),
            ("boundary_mib", "stage boundary MiB", ".1f"), ("decode_ms", "decode ms/token", ".1f"),
            ("decode_ratio", "vs full", ".2f"),
            ("rss_mib", "peak RSS above weights MiB", ".0f"), ("rss_ratio", "vs full", ".2f"),
            ("each", "each run, s", "")]
    text = header("Prefill from the packed cache vs the full cache (SmolLM2-135M, CPU)", argv)
    text += (f"- settings: SmolLM2-135M-Instruct fp32 on CPU, torch threads {a.threads}; prompt = "
             f"WikiText-2 tokens + a {len(QUESTION)}-character question; {a.repeats} interleaved repeats; "
             f"decode = {a.decode} greedy steps after the prefill; compressed rows chunk at 512 and attend "
             "straight from the packed blocks (`kvcomp_packed` attention).\n\n")
    text += table(rows, cols) + "\n\n## Goals (issue 20)\n\n" + "\n".join(goals(rows)) + "\n"
    if prof:
        cats = [*SCOPES, "other", "total"]
        prow = [{"row": k, **{c: v[c] for c in cats}} for k, v in prof.items()]
        text += (f"\n## Where the {max(a.lengths)}-token prefill's time goes (torch.profiler, one run each, "
                 "seconds; profiler overhead included)\n\n" + table(prow, [("row", "row", "")] +
                                                                   [(c, c, ".2f") for c in cats]) + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode", type=int, default=8, help="decode steps timed after each prefill")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-rss", dest="rss", action="store_false")
    p.add_argument("--rss-all", action="store_true", help="peak RSS at every length (default: the longest only, "
                   "where the goal is; a fresh process per row and length)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--rows", nargs="+", default=None, help="a subset of the rows (full cache and the kvcomp fp "
                   "chunked store always run)")
    p.add_argument("--smoke", action="store_true", help="lengths 300 and 700, 1 repeat, 2 decode steps")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prefill.md")
    a = p.parse_args(argv)
    if a.smoke:
        a.lengths, a.repeats, a.decode = [300, 700], 1, 2
    rows, prof = measure(a)
    text = render(a, rows, prof, ["benchmarks.prefill", *(sys.argv[1:] if argv is None else argv)])
    publish(a.out, text)


if __name__ == "__main__":
    main()

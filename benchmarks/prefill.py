"""Prefill and decode straight from the packed cache vs the full cache: time, decode, memory, where time goes.

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
re-applying / inverting it; the model's own RoPE is in "other"), scoring, other. ``--e2e``: wall time of one
``python -m runners.run +experiment=<row> task=passkey task.context_length=4000 task.n_samples=10`` each for
``E2E`` (a fresh process each, startup included). The presets chunk at 512 and the "fp chunked 512 (kvcomp
store)" row is their prefill goals' baseline; rows named ", chunk 1024" run the same methods at 1024 against the
fp store at 1024 (the chunk size recommended on CPU: ``benchmarks/results/prefill_chunk.md``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO, compose, header, load, median, publish, rss_in_subprocess, table, wikitext_ids
from benchmarks.rows_stage import FASTKV_CHUNK, FASTKV_EARLIER

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
    ("fastkv tuned (tsp_rate=0.4, earlier preset)", "fastkv", [*FASTKV_EARLIER, "propagation.tsp_rate=0.4"]),
    ("prompt_guided, question=end", "prompt_guided", ["compressor.question=end"]),
    ("prompt_guided, question=end, attention_from=0.5", "prompt_guided", ["compressor.question=end",
                                                                          "scorer.attention_from=0.5"]),
    ("prompt_guided_end (no propagation)", "prompt_guided_end", []),
    ("prompt_guided, schedule=chunk", "prompt_guided", ["propagation.schedule=chunk"]),
    ("fastkv, schedule=chunk (per-chunk budget)", "fastkv", FASTKV_CHUNK),
    # the same methods chunked at 1024 (livekvquant's warm-up kept at 1024 tokens), against the fp store at 1024
    ("fp chunked 1024 (kvcomp store, split attention)", "full_cache",
     ["compressor=unified", "quantizer=none", "compressor.chunk_size=1024"]),
    ("int4, chunk 1024", "int4", ["compressor.chunk_size=1024"]),
    ("kvquant_stream, chunk 1024", "kvquant_stream", ["compressor.chunk_size=1024"]),
    ("livekvquant, chunk 1024 (1 warm-up chunk)", "livekvquant",
     ["compressor.chunk_size=1024", "quantizer.warmup_chunks=1"]),
    ("prompt_guided_end, chunk 1024", "prompt_guided_end", ["compressor.chunk_size=1024"]),
]
#: end-to-end rows: experiment names run through runners.run on the passkey task
E2E = ("full_cache", "kvquant_stream", "prompt_guided_end")
E2E_ARGS = ["task=passkey", "task.context_length=4000", "task.n_samples=10"]
FP_STORE = "fp chunked 512 (kvcomp store, split attention)"
FP_STORE_1024 = "fp chunked 1024 (kvcomp store, split attention)"


def at_1024(row: tuple[str, str, list[str]]) -> bool:
    """Whether a ``ROWS`` entry chunks at 1024 (its baseline is then the fp store at 1024)."""
    return "compressor.chunk_size=1024" in row[2]


def store_for(label: str) -> str:
    """The fp kvcomp store row chunked at the same size as ``label`` (the prefill goals' baseline)."""
    return FP_STORE_1024 if any(x[0] == label and at_1024(x) for x in ROWS) else FP_STORE


BOUNDARY: dict[int, int] = {}  # id(compressor) -> peak bytes of its stage boundary (last prefill)
#: rows every run keeps (the ratios' denominators)
BASE_ROWS = ("full cache", FP_STORE)
SCOPES = {"attention": ("kvcomp::attend", "aten::scaled_dot_product_attention"),
          "dequantize": ("kvcomp::dequantize",), "quantize/pack": ("kvcomp::quantize",), "RoPE": ("kvcomp::rope",),
          "scoring": ("kvcomp::score",), "linear": ("aten::linear",)}


def compressor(exp: str, extra: list[str]) -> Any:
    from kvcomp.experiment import build_parts

    return build_parts(compose([f"+experiment={exp}", *extra])).compressor


#: the clock timings read: wall seconds, or this process's CPU seconds (``--clock cpu``: robust to other jobs
#: on a shared machine at 1 thread, where it is the work done; at more threads it also counts waiting threads)
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


@torch.inference_mode()
def run_once(model: Any, comp: Any, ids: torch.Tensor, qids: torch.Tensor, decode: int
             ) -> tuple[float, float | None]:
    """(prefill seconds, median decode ms/token over ``decode`` greedy steps right after it); a stage-schedule
    row's peak boundary bytes (``Session.stats``) go to ``BOUNDARY[id(comp)]``."""
    with comp.session(model, qids) as s:
        t0 = clock()
        logits = s.prefill(ids)
        dt = clock() - t0
        if s.schedule is not None:
            BOUNDARY[id(comp)] = s.schedule.boundary_bytes
        steps = []
        nxt = logits.argmax(-1)[:, None]
        for _ in range(decode):
            t1 = clock()
            nxt = s.step(nxt).argmax(-1)[:, None]
            steps.append(1000 * (clock() - t1))
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


def measure(a: argparse.Namespace, partial: Any = None) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Every row at every length, then the profile; ``partial(rows, prof)`` after each length and the profile
    (the results file is written as the run goes: a long run cut short keeps what it measured)."""
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
            fp = times.get(store_for(label))
            r["ratio_fp"] = r["prefill_s"] / median(fp) if fp else None
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
        if partial:
            partial(rows, prof)
    if a.profile:
        n = max(a.lengths)
        ids = torch.cat([wikitext_ids(tok, n), qids], dim=1)
        for label in order:
            prof[label] = profile(model, comps[label], ids, qids)
            print(f"  profile {n} {label}: {prof[label]}", file=sys.stderr)
            if partial:
                partial(rows, prof)
    return rows, prof


def goals(rows: list[dict[str, Any]], e2e: dict[str, float]) -> list[str]:
    def get(n: int, label: str, key: str) -> float | None:
        return next((r.get(key) for r in rows if r["tokens"] == n and r["row"] == label), None)

    out = []

    def check(text: str, value: float | None, limit: float) -> None:
        if value is None:
            out.append(f"- [ ] {text}: not measured")
        else:
            out.append(f"- [{'x' if value <= limit else ' '}] {text} ≤ {limit}x: measured {value:.2f}x "
                       f"({'met' if value <= limit else 'NOT met'})")

    def vs_store(n: int, label: str) -> float | None:
        a, b = get(n, label, "prefill_s"), get(n, store_for(label), "prefill_s")
        return a / b if a and b else None

    lengths = sorted({r["tokens"] for r in rows})
    compressed = [r[0] for r in ROWS if r[1] != "full_cache"]
    for label, limit in (("kvquant_stream", 0.8), ("int4", 0.7), ("livekvquant", 1.0), ("prompt_guided", 1.0)):
        check(f"8192: {label} decode ms/token vs full", get(8192, label, "decode_ratio"), limit)
    for label in compressed:
        check(f"4096: {label} decode ms/token vs full", get(4096, label, "decode_ratio"), 1.0)
    for n in (n for n in lengths if n >= 4096):
        chunked_1024 = [r[0] for r in ROWS if r[1] in ("int4", "kvquant_stream", "livekvquant") and at_1024(r)]
        for label in ("int4", "kvquant_stream", "livekvquant", *chunked_1024):
            check(f"{n}: {label} prefill vs the fp chunked kvcomp store at its chunk size", vs_store(n, label), 1.05)
        check(f"{n}: prompt_guided prefill vs the fp chunked kvcomp store", vs_store(n, "prompt_guided"), 0.75)
        for label in compressed:
            check(f"{n}: {label} prefill vs the unchunked full cache", get(n, label, "ratio"), 1.10)
    base = e2e.get("full_cache")
    for exp in E2E[1:]:
        check(f"passkey 4000 x 10 end to end: {exp} wall time vs full_cache",
              e2e[exp] / base if base and exp in e2e else None, 1.0)
    return out


def end_to_end(threads: int) -> dict[str, float]:
    """Wall seconds of one ``runners.run`` process per ``E2E`` experiment (passkey, 4000 tokens, 10 samples)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    out = {}
    for exp in E2E:
        cmd = [sys.executable, "-m", "runners.run", f"+experiment={exp}", *E2E_ARGS, "hydra.run.dir=/tmp/kvcomp_e2e"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        out[exp] = time.perf_counter() - t0
        print(f"  e2e {exp}: {out[exp]:.1f} s", file=sys.stderr)
    return out


def render(a: argparse.Namespace, rows: list[dict[str, Any]], prof: dict[str, dict[str, float]],
           argv: list[str], e2e: dict[str, float] | None = None) -> str:
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
             f"decode = {a.decode} greedy steps after the prefill; compressed rows chunk at 512 (unless the row says "
             "1024) and attend "
             "straight from the packed blocks (`kvcomp_packed` attention).\n\n")
    text += table(rows, cols) + "\n"
    if e2e:
        text += (f"\n## End to end: `python -m runners.run +experiment=<row> {' '.join(E2E_ARGS)}` (one process "
                 "each, wall seconds, startup included)\n\n" + table(
                     [{"row": k, "s": v, "ratio": v / e2e["full_cache"]} for k, v in e2e.items()],
                     [("row", "experiment", ""), ("s", "wall s", ".1f"), ("ratio", "vs full_cache", ".2f")]) + "\n")
    text += "\n## Goals\n\n" + "\n".join(goals(rows, e2e or {})) + "\n"
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
    p.add_argument("--e2e", action="store_true", help="also time runners.run on passkey (4000 tokens, 10 samples)")
    p.add_argument("--clock", choices=list(CLOCK), default="wall", help="wall seconds, or CPU seconds of this process")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end rows (a separate results file)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prefill.md")
    a = p.parse_args(argv)
    global ROWS, clock
    clock = CLOCK[a.clock]
    if a.rows:
        known = {x[0] for x in ROWS} | {x[0].split(" (")[0] for x in ROWS}
        unknown = [r for r in a.rows if r not in known]
        if unknown:
            raise SystemExit(f"error: --rows {unknown[0]!r} is not one of: {', '.join(x[0] for x in ROWS)}")
        picked = [x for x in ROWS if x[0] in BASE_ROWS or x[0] in a.rows or x[0].split(" (")[0] in a.rows]
        if any(at_1024(x) for x in picked):  # their baseline
            picked = [x for x in ROWS if x in picked or x[0] == FP_STORE_1024]
        ROWS = picked
    if a.smoke:
        a.lengths, a.repeats, a.decode = [300, 700], 1, 2
    cmd = ["benchmarks.prefill", *(sys.argv[1:] if argv is None else argv)]

    def partial(rows: list[dict[str, Any]], prof: dict[str, dict[str, float]]) -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(render(a, [dict(r) for r in rows], prof, cmd) + "\n(partial: the run is still going)\n")

    rows, prof = ([], {}) if a.e2e_only else measure(a, partial)
    e2e = end_to_end(a.threads) if a.e2e or a.e2e_only else None
    publish(a.out, render(a, rows, prof, cmd, e2e))


if __name__ == "__main__":
    main()

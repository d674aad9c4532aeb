"""Importance-based methods vs the full cache on SmolLM2-135M, side by side in one run (the default rows).

Columns: bytes the cache holds vs an fp16 cache of every token seen; task score at ``--context``
tokens relative to the full cache (same samples); TTFT (prefill of ``--ttft-tokens`` WikiText-2 tokens
plus a question) relative to the full cache, median of ``--repeats``, configurations interleaved.
``snapkv@eq``/``h2o@eq`` store with the same quantizer as ``prompt_guided`` and keep the fraction of
tokens that makes their kv_bytes match ``prompt_guided``'s on the same task samples
(calibrated by a few secant steps on the task runs themselves), for the equal-bytes comparison.

    python -m benchmarks.methods --no-ttft       # offline suite (passkey, needle) at 1k, 30 samples each
    python -m benchmarks.methods --rows full_cache prompt_guided snapkv   # some rows (two processes: split them)
    python -m benchmarks.methods --subtasks passkey needle kv_retrieval passage_retrieval passage_count
    python -m benchmarks.methods --ttft-only      # TTFT columns alone (methods_ttft.md, ~10 min)

Every row runs with ``task.fidelity=true`` into its own run dir under ``--runs`` (finished rows are read
back, so rows can be split over processes and a killed run resumes); the full cache's answer log-probs are
computed once (by the full_cache row) and reused from the on-disk store. Scores carry a 95 % interval
(Wilson), and each row's paired difference to the full cache (bootstrap over the same samples); ``*`` marks
a difference whose interval excludes 0. Add a row to ``ROWS`` (name -> experiment + overrides).

The default subtasks are the offline tasks SmolLM2-135M solves with the full cache (README "Evaluation");
on the other three its full-cache score is 0, so a ratio to it says nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import compose, header, load, median, publish, table, timed_prefill, wikitext_ids
from benchmarks.quality import ci_cell, diff_cell, pair, run_row, slug, verdict
from benchmarks.rows_prompt_guided import ROWS as PROMPT_GUIDED_ROWS
from benchmarks.rows_stage import ROWS as STAGE_ROWS
from kvcomp.stats import half_width

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "What is the main topic of the text above? Answer in one sentence."
BASE = ["full_cache", "kvquant_stream", "prompt_guided", "snapkv", "h2o", "streaming_llm", "fastkv"]
#: the quality rows: name -> (experiment, overrides). Add a row here (e.g. a question-timing variant).
ROWS: dict[str, tuple[str, list[str]]] = {
    **{e: (e, []) for e in BASE},
    "prompt_guided, propagation=none": ("prompt_guided", ["propagation=none"]),
}
#: prompt_guided variants (question timing, normalisation, propagation) and the stage-schedule rows:
#: run them with --rows "<name>" ...
EXTRA_ROWS: dict[str, tuple[str, list[str]]] = {**PROMPT_GUIDED_ROWS, **STAGE_ROWS}
#: equal-bytes rows: same quantizer as prompt_guided, keep ratio calibrated to prompt_guided's kv_bytes;
#: ``snapkv@eq:<row>`` calibrates to another quality row's kv_bytes instead (e.g. ``prompt_guided, question=end``)
EQ_PEERS = ("snapkv@eq", "h2o@eq")


def eq_split(name: str) -> tuple[str, str] | None:
    """``"snapkv@eq:<row>"`` -> ``("snapkv", "<row>")`` (the row defaults to prompt_guided); None if not an
    equal-bytes row or its target is not a quality row."""
    head, sep, target = name.partition(":")
    if head not in EQ_PEERS or (sep and target not in {**ROWS, **EXTRA_ROWS}):
        return None
    return head.split("@")[0], target or "prompt_guided"


def score(exp: str, task: list[str], extra: list[str]) -> dict[str, Any]:
    from kvcomp.experiment import run

    return run(compose([f"+experiment={exp}", *task, *extra]))


def compressor(exp: str, extra: list[str] | None = None) -> Any:
    from kvcomp.experiment import build_parts

    return build_parts(compose([f"+experiment={exp}", *(extra or [])])).compressor


def match_keep(peer: str, extra: list[str], task: list[str], target: float, tol: float = 0.03
               ) -> tuple[float, dict[str, Any]]:
    """keep_ratio at which ``peer`` (with ``extra``) holds as many kv_bytes on ``task`` as ``target`` (bytes,
    ``prompt_guided``'s on the same samples), and the metrics of that run. The task runs themselves are the
    calibration (bytes depend on the prompts), and bytes are close to linear in keep_ratio, so a few secant
    steps suffice; the run closest to ``target`` is returned."""
    runs: list[tuple[float, dict[str, Any]]] = []
    keep = 0.5
    for _ in range(4):
        m = score(peer, task, [*extra, f"compressor.precision.keep_ratio={keep:.4f}"])
        runs.append((keep, m))
        print(f"  calibrate {peer}: keep {keep:.4f} -> kv_bytes {m['kv_bytes'] / target:.3f}x prompt_guided",
              file=sys.stderr)
        if abs(m["kv_bytes"] / target - 1) < tol:
            break
        (k0, b0), (k1, b1) = ((runs[-2][0], runs[-2][1]["kv_bytes"]) if len(runs) > 1 else (0.0, 0.0),
                              (runs[-1][0], runs[-1][1]["kv_bytes"]))
        keep = min(1.0, max(0.01, k1 + (target - b1) * (k1 - k0) / (b1 - b0)))
    return min(runs, key=lambda r: abs(r[1]["kv_bytes"] - target))


def ttft(tokens: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of a prefill of ``tokens`` WikiText-2 tokens + a question per BASE configuration, ``repeats``
    times, configurations interleaved (reversed order every other round)."""
    model, tok, _ = load("full_cache")
    qids = torch.tensor([tok(QUESTION, add_special_tokens=False)["input_ids"]])
    comps = {e: compressor(e) for e in BASE}
    ids = torch.cat([wikitext_ids(tok, tokens), qids], dim=1)
    times: dict[str, list[float]] = {e: [] for e in BASE}
    for r in range(repeats):
        for e in BASE if r % 2 == 0 else BASE[::-1]:
            times[e].append(timed_prefill(model, comps[e], ids, qids)[0])
            print(f"  TTFT {tokens} {e:>15}: {times[e][-1]:.2f} s", file=sys.stderr)
    return times


def ttft_only(a: argparse.Namespace, argv: list[str] | None) -> str:
    """``--ttft-only``: the TTFT columns alone (to measure them with nothing else running)."""
    times = ttft(a.ttft_tokens, a.repeats)
    full = median(times["full_cache"])
    rows = [{"experiment": e, "ttft_s": median(t), "ttft_rel": median(t) / full,
             "runs": " ".join(f"{x:.2f}" for x in t)} for e, t in times.items()]
    cols = [("experiment", "configuration", ""), ("ttft_s", f"TTFT s @{a.ttft_tokens} (median)", ".2f"),
            ("ttft_rel", "TTFT vs full", ".2f"), ("runs", "each run, s", "")]
    pg = next(r for r in rows if r["experiment"] == "prompt_guided")
    text = (header("Prefill time (TTFT) of the importance-based methods vs full cache",
                   ["benchmarks.methods", *(argv or sys.argv[1:])])
            + f"- settings: SmolLM2-135M-Instruct fp32 on CPU, sdpa, chunks of 512; prefill of {a.ttft_tokens} "
            f"WikiText-2 tokens + a question, {a.repeats} interleaved rounds; full cache unchunked.\n\n"
            + table(rows, cols) + f"\n\nGoal:\n- [{'x' if pg['ttft_rel'] <= 0.65 else ' '}] prompt_guided "
            f"with layer_ratio propagation: TTFT {pg['ttft_rel']:.2f}x the full cache (goal <= 0.65x)\n")
    out = a.out if a.out != RESULTS / "methods.md" else RESULTS / "methods_ttft.md"
    out.write_text(text)
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="offline_suite")
    p.add_argument("--subtasks", nargs="+", default=["passkey", "needle"], help="for --task offline_suite")
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--samples", type=int, default=30, help="per subtask for offline_suite (depths spread evenly)")
    p.add_argument("--calib-samples", type=int, default=4, help="per subtask, for the @eq keep-ratio calibration")
    p.add_argument("--rows", nargs="+", default=None, help=f"subset of: {', '.join([*ROWS, *EQ_PEERS, *EXTRA_ROWS])}; "
                   "snapkv@eq:<row> / h2o@eq:<row> match another row's kv_bytes")
    p.add_argument("--ttft-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-ttft", action="store_true", help="skip the TTFT columns (see --ttft-only)")
    p.add_argument("--runs", type=Path, default=Path("outputs/bench_methods"),
                   help="one run dir per row (metrics.json + predictions.jsonl); finished rows are read back")
    p.add_argument("--fresh", action="store_true", help="rerun rows whose run dir already finished")
    p.add_argument("--only-finished", action="store_true", help="table of the rows already finished, run nothing")
    p.add_argument("--out", type=Path, default=RESULTS / "methods.md")
    p.add_argument("--ttft-only", action="store_true", help="only the TTFT columns, to methods_ttft.md")
    p.add_argument("--model", nargs="*", default=[], help="extra overrides of every quality row (model=tiny_llama)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if a.ttft_only:
        return ttft_only(a, argv)
    t_start = time.time()

    def task(n: int, fidelity: bool = True) -> list[str]:
        t = [f"task={a.task}", f"task.context_length={a.context}", f"task.n_samples={n}", f"task.fidelity={fidelity}",
             *a.model]
        return t + ([f"task.subtasks=[{','.join(a.subtasks)}]"] if a.task == "offline_suite" else [])

    wanted = a.rows or [*ROWS, *EQ_PEERS]
    rows: dict[str, dict[str, Any]] = {}
    skipped = []
    q = compose(["+experiment=prompt_guided"]).quantizer.name
    for name in wanted:  # in the order given: the most informative rows first when time is short
        if a.only_finished and not (a.runs / slug(name) / "metrics.json").exists():
            skipped.append(name)
            continue
        if name in ROWS or name in EXTRA_ROWS:
            exp, extra = ROWS.get(name) or EXTRA_ROWS[name]
        elif eq_split(name):  # same quantizer as prompt_guided, keep ratio calibrated to the target's kv_bytes
            exp, target = eq_split(name)  # type: ignore[misc]
            done = a.runs / slug(name) / "overrides.json"
            if done.exists() and not a.fresh:
                extra = [o for o in json.loads(done.read_text()) if o.startswith(("quantizer=", "compressor."))]
            else:
                base = [f"quantizer={q}", "compressor.chunk_size=512"]
                calib = task(a.calib_samples, fidelity=False)
                t_exp, t_extra = ROWS.get(target) or EXTRA_ROWS[target]
                keep, _ = match_keep(exp, base, calib, score(t_exp, calib, t_extra)["kv_bytes"])
                extra = [*base, f"compressor.precision.keep_ratio={keep:.4f}"]
        else:
            raise SystemExit(f"error: --rows {name} is not one of: {', '.join([*ROWS, *EQ_PEERS, *EXTRA_ROWS])} "
                             "(or snapkv@eq:<row>, h2o@eq:<row>)")
        rows[name] = row(name, exp, extra, task(a.samples), a)
    if "full_cache" not in rows or len(rows) < 2:
        print(f"rows {', '.join(rows)} done in {a.runs}; rerun with full_cache and another row to write the table",
              file=sys.stderr)
        return ""
    times = {} if a.no_ttft else ttft(a.ttft_tokens, a.repeats)
    full = rows["full_cache"]
    for e, r in rows.items():
        r["score_rel"] = r["score"] / full["score"] if full["score"] else None
        if e in times:
            r["ttft_s"] = median(times[e])
            r["ttft_rel"] = r["ttft_s"] / median(times["full_cache"])
    text = render(rows, a, argv, time.time() - t_start, skipped)
    return publish(a.out, text)


def row(name: str, exp: str, extra: list[str], task: list[str], a: argparse.Namespace) -> dict[str, Any]:
    """One table row: run (or read back) ``exp`` + ``extra`` on ``task`` with fidelity on."""
    m, recs = run_row(name, [f"+experiment={exp}", *task, *extra], a.runs, resume=not a.fresh)
    r = {"experiment": name, "score": m["score"], "bytes_ratio": m["kv_bytes_fp16"] / m["kv_bytes"],
         "kv_bytes": m["kv_bytes"], "extra": extra, "metrics": m, "records": recs}
    print(f"  {name:>15}: score {m['score']:.2f}  fp16/kv {r['bytes_ratio']:.2f}  kl_full {m.get('kl_full')}",
          file=sys.stderr)
    return r


def render(rows: dict[str, dict[str, Any]], a: argparse.Namespace, argv: list[str] | None, wall_s: float,
           skipped: list[str]) -> str:
    """The markdown: settings, the table (``value ± half-width (n)``, paired differences vs the full cache),
    paired differences between rows, and the goals."""
    full = rows["full_cache"]
    subs = a.subtasks if a.task == "offline_suite" else []
    lines = ["| configuration | fp16 bytes / kv_bytes | score | "
             + "".join(f"{s} | " for s in subs)
             + "score − full [95 % CI] | kl_full (nats) | top1_agree | answer_nll − full [95 % CI] | TTFT vs full |",
             "|---|" + "---:|" * (7 + len(subs))]
    worst_hw = 0.0
    for name, r in rows.items():
        m, recs = r["metrics"], r["records"]
        d_score = pair(recs, full["records"], "score", scale=100.0)
        d_nll = pair(recs, full["records"], "answer_nll")
        if name != "full_cache" and d_score.get("low") is not None:
            worst_hw = max(worst_hw, half_width(d_score) or 0.0)
        cells = [name, f"{r['bytes_ratio']:.2f}", ci_cell(m, "score"),
                 *(ci_cell(m, f"score_{s}") for s in subs),
                 "—" if name == "full_cache" else diff_cell(d_score),
                 ci_cell(m, "kl_full", ".3g"), ci_cell(m, "top1_agree", ".3f"),
                 "—" if name == "full_cache" else diff_cell(d_nll, "+.3f"),
                 "—" if r.get("ttft_rel") is None else f"{r['ttft_rel']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    # the reference of the between-rows table: prompt_guided, else the first row after the full cache
    ref = "prompt_guided" if "prompt_guided" in rows else next(n for n in rows if n != "full_cache")
    pg = rows[ref]
    between = [f"| {ref} vs | score difference [95 % CI] | verdict | kl_full difference [95 % CI] |",
               "|---|---:|---|---:|"]
    for name, r in rows.items():
        if name in (ref, "full_cache"):
            continue
        ds = pair(pg["records"], r["records"], "score", scale=100.0)
        dk = pair(pg["records"], r["records"], "kl_full")
        between.append(f"| {name} | {diff_cell(ds)} | {verdict(ds)} | {diff_cell(dk, '+.3g')} |")
    n_min = min((iv["n"] for r in rows.values() for k, iv in r["metrics"].get("ci", {}).items()
                 if k.startswith("score_")), default=min(r["metrics"]["ci"]["score"]["n"] for r in rows.values()))
    goals = [f"- [{'x' if n_min >= 30 else ' '}] n >= 30 per subtask per row (smallest: {n_min})",
             f"- [{'x' if worst_hw <= 7 else ' '}] paired score differences to the full cache resolvable to 10 points "
             f"(largest interval half-width {worst_hw:.1f} points; goal <= 7)"]
    goals += [f"- [{'x' if r['bytes_ratio'] >= 4.5 and (r.get('score_rel') or 0) >= 0.98 else ' '}] {n}: kv_bytes "
              f"{r['bytes_ratio']:.2f}x smaller than fp16 (goal >= 4.5x) at {100 * (r.get('score_rel') or 0):.1f} % of "
              "the full cache's score (goal >= 98 %); the paired difference and its interval are in the table"
              for n, r in rows.items() if n.startswith("prompt_guided")]
    for name, r in rows.items():  # fastkv: >= 90 % of the full cache's score, the interval's lower bound >= 80 %
        d = pair(r["records"], full["records"], "score", scale=100.0) if name.startswith("fastkv") else {}
        if d.get("low") is not None and not full["score"]:
            goals.append(f"- [ ] {name}: the full cache scores 0 here (goal >= 90 % of it): no ratio")
        elif d.get("low") is not None:
            rel, low = r["score"] / full["score"], (full["score"] + d["low"]) / full["score"]
            goals.append(f"- [{'x' if rel >= 0.9 and low >= 0.8 else ' '}] {name}: {100 * rel:.0f} % of the full "
                         f"cache's score (goal >= 90 %), lower bound {100 * low:.0f} % (goal >= 80 %)")
    for peer, r in rows.items():
        split = eq_split(peer)
        if split is None or split[1] not in rows:
            continue
        t = rows[split[1]]
        equal = abs(r["kv_bytes"] / t["kv_bytes"] - 1) <= 0.05
        ds = pair(t["records"], r["records"], "score", scale=100.0)
        dk = pair(t["records"], r["records"], "kl_full")
        goals.append(f"- at equal kv_bytes ({split[1]} {t['bytes_ratio']:.2f}x vs {peer} "
                     f"{r['bytes_ratio']:.2f}x, {'within' if equal else 'NOT within'} 5 %): {split[1]} − "
                     f"{peer} = {diff_cell(ds)} points, {verdict(ds)}; kl_full {diff_cell(dk, '+.3g')} "
                     f"({' '.join(r['extra'])})")
    hits = sum(r["metrics"].get("fidelity_cache_hits", 0) for r in rows.values())
    misses = sum(r["metrics"].get("fidelity_cache_misses", 0) for r in rows.values())
    walls = ", ".join(f"{k} {r['metrics'].get('wall_s', float('nan')) / 60:.1f}" for k, r in rows.items())
    per = f" per subtask ({', '.join(subs)}, depths (i+1)/(n+1))" if subs else ""
    model = " ".join(a.model) if a.model else "SmolLM2-135M-Instruct"
    settings = (f"{model} fp32 on CPU, sdpa, chunks of 512; task {a.task} at {a.context} tokens, "
                f"{a.samples} samples{per}; greedy; full cache unchunked. Fidelity on: the gold answer is "
                "teacher-forced after the prompt, one decode step per token; kl_full = mean KL(full ‖ method) over "
                "the answer positions. Intervals: Wilson (exact-match rates), percentile bootstrap over samples "
                "(2000 resamples, seed 0) for means and for paired differences (same samples, matched by id); "
                f"`*` = the interval excludes 0. @eq keep ratios calibrated on {a.calib_samples} samples per subtask.")
    ttft = ("" if a.no_ttft else f" TTFT = prefill of {a.ttft_tokens} WikiText-2 tokens + a question, median of "
            f"{a.repeats}.")
    return (header("Importance-based compression vs full cache", ["benchmarks.methods", *(argv or sys.argv[1:])])
            + f"- settings: {settings}{ttft}\n"
            + f"- full-cache log-probs: {hits} hit(s), {misses} miss(es) over all rows; wall time per row (min, "
            f"1 thread, 2 shared cores): {walls}; whole benchmark {wall_s / 60:.1f} min\n"
            + (f"- not run (out of time): {', '.join(skipped)}\n" if skipped else "") + "\n"
            + "\n".join(lines) + "\n\nPaired differences between rows (same samples):\n\n" + "\n".join(between)
            + "\n\nGoals:\n" + "\n".join(goals) + "\n")


if __name__ == "__main__":
    main()

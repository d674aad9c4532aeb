"""Importance-based methods vs the full cache on SmolLM2-135M, side by side in one run (issue 6 rows).

Columns: bytes the cache holds vs an fp16 cache of every token seen; task score at ``--context``
tokens relative to the full cache (same samples); TTFT (prefill of ``--ttft-tokens`` WikiText-2 tokens
plus a question) relative to the full cache, median of ``--repeats``, configurations interleaved.
``snapkv@eq``/``h2o@eq`` store with the same quantizer as ``prompt_guided`` and keep the fraction of
tokens that makes their kv_bytes match ``prompt_guided``'s on the same task samples
(calibrated by a few secant steps on the task runs themselves), for the equal-bytes comparison.

    python -m benchmarks.methods                  # offline suite (passkey, needle) at 4k, TTFT at 8k (~25 min)
    python -m benchmarks.methods --subtasks passkey needle kv_retrieval passage_retrieval passage_count
    python -m benchmarks.methods --ttft-only      # TTFT columns alone (methods_ttft.md, ~10 min)

The default subtasks are the offline tasks SmolLM2-135M solves with the full cache (README "Evaluation");
on the other three its full-cache score is 0, so a ratio to it says nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import compose, header, load, median, table, timed_prefill, wikitext_ids
from benchmarks.rows_issue17 import ROWS as ISSUE17_ROWS

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "What is the main topic of the text above? Answer in one sentence."
VARIANTS = {"prompt_guided, propagation=none": ["propagation=none"],
            **{name: extra for name, (_, extra) in ISSUE17_ROWS.items()}}
BASE = ["full_cache", "kvquant_stream", "prompt_guided", "snapkv", "h2o", "streaming_llm", "fastkv"]


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
            + table(rows, cols) + f"\n\nGoal (issue 6):\n- [{'x' if pg['ttft_rel'] <= 0.65 else ' '}] prompt_guided "
            f"with layer_ratio propagation: TTFT {pg['ttft_rel']:.2f}x the full cache (goal <= 0.65x)\n")
    out = a.out if a.out != RESULTS / "methods.md" else RESULTS / "methods_ttft.md"
    out.write_text(text)
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="offline_suite")
    p.add_argument("--subtasks", nargs="+", default=["passkey", "needle"], help="for --task offline_suite")
    p.add_argument("--context", type=int, default=4000)
    p.add_argument("--samples", type=int, default=3, help="per subtask for offline_suite")
    p.add_argument("--ttft-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "methods.md")
    p.add_argument("--ttft-only", action="store_true", help="only the TTFT columns, to methods_ttft.md")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if a.ttft_only:
        return ttft_only(a, argv)
    task = [f"task={a.task}", f"task.context_length={a.context}", f"task.n_samples={a.samples}"]
    if a.task == "offline_suite":
        task.append(f"task.subtasks=[{','.join(a.subtasks)}]")
    rows: dict[str, dict[str, Any]] = {}
    for exp in BASE:
        m = score(exp, task, [])
        rows[exp] = {"experiment": exp, "score": m["score"], "bytes_ratio": m["kv_bytes_fp16"] / m["kv_bytes"],
                     "kv_bytes": m["kv_bytes"], "extra": []}
        print(f"  {exp:>15}: score {m['score']:.2f}  fp16/kv {rows[exp]['bytes_ratio']:.2f}", file=sys.stderr)
    # ablation: where prompt_guided loses score (precision tiers alone, no propagation)
    for name, extra in VARIANTS.items():
        m = score("prompt_guided", task, extra)
        rows[name] = {"experiment": name, "score": m["score"], "bytes_ratio": m["kv_bytes_fp16"] / m["kv_bytes"],
                      "kv_bytes": m["kv_bytes"], "extra": extra}
        print(f"  {name:>15}: score {m['score']:.2f}  fp16/kv {rows[name]['bytes_ratio']:.2f}", file=sys.stderr)
    # equal-bytes peers: same quantizer as prompt_guided, keep ratio calibrated to its kv_bytes on these samples
    q = compose(["+experiment=prompt_guided"]).quantizer.name
    for peer in ("snapkv", "h2o"):
        base = [f"quantizer={q}", "compressor.chunk_size=512"]
        keep, m = match_keep(peer, base, task, rows["prompt_guided"]["kv_bytes"])
        name = f"{peer}@eq"
        rows[name] = {"experiment": name, "score": m["score"], "bytes_ratio": m["kv_bytes_fp16"] / m["kv_bytes"],
                      "kv_bytes": m["kv_bytes"], "extra": [*base, f"compressor.precision.keep_ratio={keep:.4f}"]}
        print(f"  {name:>15}: score {m['score']:.2f}  fp16/kv {rows[name]['bytes_ratio']:.2f}", file=sys.stderr)
    times = ttft(a.ttft_tokens, a.repeats)
    full = rows["full_cache"]
    for e, r in rows.items():
        r["score_rel"] = r["score"] / full["score"] if full["score"] else None
        if e in times:
            r["ttft_s"] = median(times[e])
            r["ttft_rel"] = r["ttft_s"] / median(times["full_cache"])
    cols = [("experiment", "configuration", ""), ("bytes_ratio", "fp16 bytes / kv_bytes", ".2f"),
            ("score", f"{a.task} score @{a.context}", ".2f"), ("score_rel", "score vs full", ".3f"),
            ("ttft_s", f"TTFT s @{a.ttft_tokens}", ".2f"), ("ttft_rel", "TTFT vs full", ".2f")]
    pg = rows["prompt_guided"]
    goals = [
        f"- [{'x' if pg['bytes_ratio'] >= 4.5 and (pg['score_rel'] or 0) >= 0.98 else ' '}] prompt_guided: "
        f"kv_bytes {pg['bytes_ratio']:.2f}x smaller than fp16 (goal >= 4.5x) at {100 * (pg['score_rel'] or 0):.1f} % "
        "of the full cache's score (goal >= 98 %)",
        f"- [{'x' if pg['ttft_rel'] <= 0.65 else ' '}] prompt_guided with layer_ratio propagation: TTFT "
        f"{pg['ttft_rel']:.2f}x the full cache at {a.ttft_tokens} tokens (goal <= 0.65x)",
    ]
    for peer in ("snapkv@eq", "h2o@eq"):
        r = rows[peer]
        equal = abs(r["kv_bytes"] / pg["kv_bytes"] - 1) <= 0.05
        goals.append(f"- [{'x' if equal and pg['score'] >= r['score'] else ' '}] at equal kv_bytes (prompt_guided "
                     f"{pg['bytes_ratio']:.2f}x vs {peer} {r['bytes_ratio']:.2f}x, "
                     f"{'within' if equal else 'NOT within'} 5 %) prompt_guided {pg['score']:.2f} vs {peer} "
                     f"{r['score']:.2f} ({' '.join(r['extra'])})")
    per = f" per subtask ({', '.join(a.subtasks)})" if a.task == "offline_suite" else ""
    settings = (f"SmolLM2-135M-Instruct fp32 on CPU, sdpa, chunks of 512; task {a.task} at {a.context} tokens, "
                f"{a.samples} samples{per}; TTFT = prefill of {a.ttft_tokens} WikiText-2 tokens + a question, "
                f"median of {a.repeats}; full cache unchunked.")
    text = (header("Importance-based compression vs full cache", ["benchmarks.methods", *(argv or sys.argv[1:])])
            + f"- settings: {settings}\n\n" + table(list(rows.values()), cols) + "\n\nGoals (issue 6):\n"
            + "\n".join(goals) + "\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()

"""Full cache vs each quantizer on SmolLM2-135M, measured side by side in one run (``make bench``).

Columns: bytes the cache holds after a 4k prefill vs an fp16 cache of the same tokens; prefill time at
4k relative to the full cache (median of ``--repeats``, configurations interleaved so machine noise hits
all alike); peak RSS above the loaded weights during an 8k prefill (fresh subprocess per row: compressed
rows chunked, the full cache unchunked) relative to the full cache; WikiText-2 perplexity on
``--ppl-windows`` windows of 1024 tokens (chunks of 512 through the compressed cache).

    python -m benchmarks.quant                       # everything (~25 min on 2 CPU cores)
    python -m benchmarks.quant --quick               # 2 repeats, 8 PPL windows, 2k/4k tokens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    compose,
    header,
    load,
    median,
    publish,
    rss_in_subprocess,
    table,
    timed_prefill,
    wikitext_ids,
)

EXPERIMENTS = ["full_cache", "int8", "int4", "kivi", "kvquant_stream", "livekvquant"]
RESULTS = Path(__file__).resolve().parent / "results"


def measure(exps: list[str], prefill_tokens: int, rss_tokens: int, repeats: int, windows: int) -> list[dict[str, Any]]:
    from kvcomp.experiment import run

    rows = {e: {"experiment": e, "times": []} for e in exps}
    parts = {e: load(e) for e in exps}  # the model is loaded once and shared (in-process cache)
    model, tok, _ = parts[exps[0]]
    ids = wikitext_ids(tok, prefill_tokens)
    for e in exps:  # warm-up pass, not timed
        timed_prefill(model, parts[e][2], ids[:, :256])
    for r in range(repeats):
        for e in exps if r % 2 == 0 else exps[::-1]:
            dt, st = timed_prefill(model, parts[e][2], ids)
            rows[e]["times"].append(dt)
            rows[e]["kv_bytes"], rows[e]["kv_bytes_fp16"] = st["kv_bytes"], st["kv_bytes_fp16"]
            rows[e]["avg_key_bits"], rows[e]["avg_value_bits"] = st["avg_key_bits"], st["avg_value_bits"]
            print(f"  prefill {prefill_tokens} {e:>15}: {dt:6.2f} s", file=sys.stderr)
    for e in exps:
        rows[e]["rss"] = rss_in_subprocess(e, rss_tokens)["peak_above_weights"]
        print(f"  peak RSS {rss_tokens} {e:>15}: {rows[e]['rss'] / 2**20:7.1f} MiB", file=sys.stderr)
        m = run(compose([f"+experiment={e}", "task=wikitext2_ppl", f"task.max_windows={windows}"]))
        rows[e]["ppl"] = m["ppl"]
        print(f"  PPL {e:>15}: {m['ppl']:.4f}", file=sys.stderr)
    base = rows[exps[0]]
    out = []
    for e in exps:
        r = rows[e]
        r["prefill_s"] = median(r.pop("times"))
        r["bytes_ratio"] = r["kv_bytes_fp16"] / r["kv_bytes"]
        r["time_ratio"] = r["prefill_s"] / base["prefill_s"]
        r["rss_ratio"] = r["rss"] / base["rss"]
        r["rss_mib"] = r["rss"] / 2**20
        r["ppl_delta"] = 100 * (r["ppl"] / base["ppl"] - 1)
        out.append(r)
    return out


def goals(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The goals set for this benchmark, each with the measured number."""
    out = []

    def check(name: str, ok: bool, text: str) -> None:
        out.append(f"- [{'x' if ok else ' '}] {name}: {text}")

    if "kvquant_stream" in rows:
        r = rows["kvquant_stream"]
        check("kvquant_stream bytes >= 3.5x smaller than fp16", r["bytes_ratio"] >= 3.5, f"{r['bytes_ratio']:.2f}x")
        check("kvquant_stream PPL within 1.0 %", r["ppl_delta"] <= 1.0, f"{r['ppl_delta']:+.2f} %")
        check("INT4 prefill <= 1.10x full cache at 4k", r["time_ratio"] <= 1.10, f"{r['time_ratio']:.2f}x")
        check("peak RSS of the chunked 8k prefill <= 0.25x full cache", r["rss_ratio"] <= 0.25,
              f"{r['rss_ratio']:.2f}x")
    if "int8" in rows:
        check("int8 PPL within 0.2 %", rows["int8"]["ppl_delta"] <= 0.2, f"{rows['int8']['ppl_delta']:+.3f} %")
    return out


COLS = [("experiment", "configuration", ""), ("bytes_ratio", "fp16 bytes / kv_bytes", ".2f"),
        ("avg_key_bits", "key bits", ".2f"), ("avg_value_bits", "value bits", ".2f"),
        ("prefill_s", "prefill s", ".2f"), ("time_ratio", "prefill vs full", ".2f"),
        ("rss_mib", "peak RSS MiB", ".0f"), ("rss_ratio", "peak RSS vs full", ".2f"),
        ("ppl", "PPL", ".3f"), ("ppl_delta", "PPL Δ %", "+.2f")]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=EXPERIMENTS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-tokens", type=int, default=4096)
    p.add_argument("--rss-tokens", type=int, default=8192)
    p.add_argument("--ppl-windows", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="2 repeats, 2k prefill, 4k RSS, 8 PPL windows")
    p.add_argument("--out", type=Path, default=RESULTS / "quant.md")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.prefill_tokens, a.rss_tokens, a.ppl_windows = 2, 2048, 4096, 8
    exps = a.experiments if a.experiments[0] == "full_cache" else ["full_cache", *a.experiments]
    torch.set_grad_enabled(False)
    rows = measure(exps, a.prefill_tokens, a.rss_tokens, a.repeats, a.ppl_windows)
    settings = (f"SmolLM2-135M-Instruct fp32 on CPU, sdpa; prefill {a.prefill_tokens} tokens (median of "
                f"{a.repeats}); peak RSS at {a.rss_tokens} tokens; WikiText-2 PPL on {a.ppl_windows} x 1024 "
                "tokens; compressed rows prefill in chunks of 512, the full cache unchunked.")
    text = (header("Quantized KV cache vs full cache", ["benchmarks.quant", *(argv or sys.argv[1:])])
            + f"- settings: {settings}\n\n" + table(rows, COLS) + "\n\nGoals:\n"
            + "\n".join(goals({r["experiment"]: r for r in rows})) + "\n")
    return publish(a.out, text)


if __name__ == "__main__":
    main()

"""KV cache at scale: a random-weight LLaMA of the Llama-3.1-8B shape, bf16 on one CUDA GPU, 8k-128k tokens.

Rows (one fresh ``benchmarks.scale_worker`` process per configuration and length): the full cache (plain
DynamicCache, unchunked prefill), kvcomp ``kvquant_stream``, ``livekvquant`` and ``prompt_guided`` (with its
selective propagation; the prompt's last ``--question-tokens`` guide it), all chunked; kvpress SnapKV and HF
QuantizedCache (quanto int4) when those packages import in ``--peer-python`` (else skipped, said so). Columns:
TTFT, peak CUDA memory above the weights during the prefill, KV bytes held, decode ms/token. Writes
``scale.md`` + ``scale.csv`` (with a Goals section: the GPU targets) to ``--out-dir``.

    python -m benchmarks.scale                                  # 8k, 32k, 128k (needs a CUDA GPU)
    python -m benchmarks.scale --lengths 8192 32768 --configs full kvquant_stream
    python -m benchmarks.scale --smoke                          # tiny model, CPU, 256 tokens (or SCALE_SMOKE=1)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, header, table

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_DIR = Path(tempfile.gettempdir()) / "kvcomp-scale-smoke"
NO_GPU = "benchmarks.scale needs a CUDA GPU; use --smoke for a CPU dry run"
GOAL_SHORT, GOAL_MID, GOAL_LONG = 8192, 32768, 131072
#: "fits on one 80 GB GPU": an H100 80 GB has 79.6 GiB; ~0.6 GiB of it goes to the CUDA context
FIT_BYTES = 79 * 2**30
GIB, MIB = 2**30, 2**20

#: key -> (row label, worker params, module that must import for the row to run, or None)
CONFIGS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "full": ("full cache", {"system": "full"}, None),
    "kvquant_stream": ("kvquant_stream", {"system": "kvcomp", "method": "kvquant_stream"}, None),
    "livekvquant": ("livekvquant", {"system": "kvcomp", "method": "livekvquant"}, None),
    "prompt_guided": ("prompt_guided", {"system": "kvcomp", "method": "prompt_guided"}, None),
    "snapkv": ("kvpress SnapKV", {"system": "kvpress", "press": "SnapKVPress"}, "kvpress"),
    "hf_quantized": ("HF QuantizedCache quanto int4", {"system": "quanto", "nbits": 4}, "optimum.quanto"),
}


def importable(python: str, module: str) -> str | None:
    """None when ``module`` imports in ``python``, else the reason (last stderr line)."""
    try:
        res = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300,
                             check=False, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if res.returncode == 0:
        return None
    lines = res.stderr.strip().splitlines()
    return lines[-1][:160] if lines else f"exit {res.returncode}"


def label(key: str, a: argparse.Namespace) -> str:
    """Row label of a configuration (kvpress rows carry their compression ratio)."""
    name = CONFIGS[key][0]
    return f"{name} {a.press_ratio:g}" if CONFIGS[key][1]["system"] == "kvpress" else name


def worker_params(key: str, a: argparse.Namespace) -> dict[str, Any]:
    """The worker's ``params`` of one configuration (chunk size / press ratio applied)."""
    params = dict(CONFIGS[key][1])
    if params["system"] == "kvcomp" and a.chunk_size:
        params["overrides"] = {"compressor.chunk_size": a.chunk_size}
    if params["system"] == "kvpress":
        params["ratio"] = a.press_ratio
    return params


def run_worker(spec: dict[str, Any], python: str, tmp: Path, timeout_s: float) -> dict[str, Any]:
    """One row in a fresh process; a failure, a timeout or a killed process becomes ``error`` in the row."""
    sp, op = tmp / "spec.json", tmp / "out.json"
    op.unlink(missing_ok=True)
    sp.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    base = {"name": spec["name"], "tokens": spec["tokens"]}
    try:
        res = subprocess.run([python, "-m", "benchmarks.scale_worker", str(sp), str(op)], cwd=REPO, env=env,
                             stderr=subprocess.PIPE, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "error": f"timeout after {timeout_s:.0f} s"}
    if res.returncode != 0 or not op.exists():
        print(res.stderr[-3000:], file=sys.stderr)
        lines = res.stderr.strip().splitlines()
        why = lines[-1][:200] if lines else f"exit {res.returncode}"
        if res.returncode < 0:
            why = f"killed by signal {-res.returncode} (host out of memory?)"
        return {**base, "status": "error", "error": why}
    print(res.stderr.rstrip(), file=sys.stderr)
    return {**json.loads(op.read_text()), "error": None}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``*_vs_full`` columns: each row's number over the full cache's at the same length."""
    full = {r["tokens"]: r for r in rows if r["key"] == "full"}
    for r in rows:
        f = full.get(r["tokens"], {})
        for col, src in (("peak_vs_full", "peak_prefill_bytes"), ("kv_vs_full", "kv_bytes"),
                         ("ttft_vs_full", "ttft_s"), ("prefill_vs_full", "prefill_s"),
                         ("decode_vs_full", "decode_ms")):
            a, b = r.get(src), f.get(src)
            r[col] = a / b if a is not None and b else None
        r["peak_prefill_gib"] = r["peak_prefill_bytes"] / GIB if r.get("peak_prefill_bytes") is not None else None
        r["kv_mib"] = r["kv_bytes"] / MIB if r.get("kv_bytes") is not None else None
        r["state"] = r.get("error") or (f"OOM ({r['oom_stage']})" if r.get("status") == "OOM" else r.get("status"))


def goals(rows: list[dict[str, Any]], smoke: bool, row_key: str = "kvquant_stream") -> list[str]:
    """The GPU goals computed from the measured rows, each met / not met / not measured, with numbers."""
    by = {(r["key"], r["tokens"]): r for r in rows}
    lengths = sorted({r["tokens"] for r in rows})
    short, mid, long_ = (lengths[0],) * 3 if smoke and lengths else (GOAL_SHORT, GOAL_MID, GOAL_LONG)
    out = []

    def line(name: str, ok: bool | None, text: str) -> None:
        tag = {True: "[x] MET", False: "[ ] NOT MET", None: "[ ] NOT MEASURED"}[ok]
        out.append(f"- {tag} — {name}: {text}")

    def ratio(n: int, col: str, limit: float, name: str, unit: str, scale: float = 1.0) -> None:
        r, f = by.get((row_key, n)), by.get(("full", n))
        a = r.get(col) if r and r.get("status") == "ok" else None
        b = f.get(col) if f and f.get("status") == "ok" else None
        if a is None or not b:
            why = ("rows missing" if r is None or f is None else
                   "not measured on this device" if r.get("status") == f.get("status") == "ok" else
                   f"{row_key}: {r.get('state')}, full: {f.get('state')}")
            line(name, None, f"no {col} for both rows at {n} tokens ({why})")
            return
        line(name, a / b <= limit, f"{a / b:.2f}x (limit {limit}x; {row_key} {a * scale:.3g} {unit} vs full "
                                  f"{b * scale:.3g} {unit} at {n} tokens)")

    ratio(mid, "peak_prefill_bytes", 0.35, "peak memory above weights, chunked compressed prefill vs full unchunked",
          "GiB", 1 / GIB)
    r = by.get((row_key, long_))
    if r is None:
        line("128k fits on one 80 GB GPU with the compressed cache", None, f"no {row_key} row at {long_} tokens")
    elif r.get("status") != "ok" or r.get("peak_reserved_bytes") is None:
        ok = False if r.get("status") == "OOM" else None
        why = r["state"] if r.get("status") != "ok" else "ran, but no CUDA memory figures on this device"
        line("128k fits on one 80 GB GPU with the compressed cache", ok, f"{row_key} at {long_} tokens: {why}")
    else:
        peak = r["peak_reserved_bytes"]
        line("128k fits on one 80 GB GPU with the compressed cache", peak <= FIT_BYTES,
             f"peak reserved {peak / GIB:.1f} GiB incl. weights (limit {FIT_BYTES / GIB:.0f} GiB) at {long_} tokens")
    ratio(long_, "decode_ms", 0.7, "decode at 128k, 4-bit cache vs full", "ms/token")
    ratio(short, "decode_ms", 1.1, "decode at 8k, 4-bit cache vs full", "ms/token")
    ratio(mid, "prefill_s", 1.05, "prefill at 32k, INT4 vs full", "s")
    if smoke:
        out.append(f"- (smoke: every goal length mapped to {short} tokens on CPU; the numbers mean nothing)")
    return out


COLS = [("name", "configuration", ""), ("tokens", "tokens", "d"), ("ttft_s", "TTFT s", ".2f"),
        ("ttft_vs_full", "TTFT vs full", ".2f"), ("peak_prefill_gib", "prefill peak above weights GiB", ".2f"),
        ("peak_vs_full", "peak vs full", ".2f"), ("kv_mib", "KV held MiB", ".2f"), ("kv_vs_full", "KV vs full", ".3f"),
        ("decode_ms", "decode ms/token", ".1f"), ("decode_vs_full", "decode vs full", ".2f"), ("state", "status", "")]
CSV_COLS = ["key", "name", "tokens", "status", "oom_stage", "error", "ttft_s", "prefill_s", "peak_prefill_bytes",
            "peak_total_bytes", "peak_reserved_bytes", "kv_bytes", "decode_ms", "weights_bytes", "chunk_size",
            "dtype", "device", "gpu", "peak_vs_full", "kv_vs_full", "ttft_vs_full", "prefill_vs_full",
            "decode_vs_full"]


def write_report(rows: list[dict[str, Any]], a: argparse.Namespace, skipped: list[str], argv: list[str]) -> str:
    """``scale.md`` and ``scale.csv`` in ``a.out_dir``; returns the markdown."""
    add_ratios(rows)
    cmd = ["benchmarks.scale", *argv]
    head = header("KV cache at scale: 8B-shaped LLaMA, one GPU", cmd)
    if os.environ.get("SCALE_SMOKE") == "1":
        head = head.replace("`python -m", "`SCALE_SMOKE=1 python -m")
    info = next((r for r in rows if r.get("versions")), {})
    gpu = (f"{info['gpu']}, {info['gpu_total_bytes'] / GIB:.1f} GiB, CUDA {info['cuda']}" if info.get("gpu")
           else "none (CPU smoke run)" if a.smoke else "unknown (no row finished)")
    model = ("tiny random LLaMA (kvcomp.model.tiny) fp32 on CPU" if a.smoke else
             "random-weight LLaMA with the Llama-3.1-8B config (4096 hidden, 32 layers, 32/8 heads, 14336 "
             "intermediate, vocab 128256, rope_theta 5e5, llama3 RoPE scaling), bf16 on cuda")
    chunks = sorted({r.get("chunk_size") for r in rows if r.get("chunk_size")})
    settings = (f"{model}, sdpa; prompt = seeded random token ids; lengths {a.lengths}; decode {a.decode_tokens} "
                f"greedy tokens; kvcomp rows chunked ({', '.join(map(str, chunks)) or 'config'} tokens per chunk), "
                f"the others in one pass; prompt_guided's question = the prompt's last {a.question_tokens} tokens; "
                "one fresh process per row, a short warm-up run before the measured one; PYTORCH_CUDA_ALLOC_CONF="
                f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True')}")
    vers = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    text = (head + f"- GPU: {gpu}\n- row versions: {vers or '—'}\n- settings: {settings}\n"
            + "".join(f"- skipped: {s}\n" for s in skipped) + "\n" + table(rows, COLS)
            + "\n\nPeak = `torch.cuda.max_memory_allocated` during the prefill minus what was allocated just before "
              "it (weights, prompt); KV held = bytes of the cache after the prefill; TTFT = prefill + first token.\n"
            + "\n## Goals (H100 80 GB, 8B-shaped model, bf16; judged on the "
              "kvquant_stream rows)\n\n" + "\n".join(goals(rows, a.smoke)) + "\n")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "scale.md").write_text(text)
    with (a.out_dir / "scale.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return text


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[GOAL_SHORT, GOAL_MID, GOAL_LONG])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--question-tokens", type=int, default=64, help="prompt_guided: question = last N prompt tokens")
    p.add_argument("--chunk-size", type=int, default=0, help="kvcomp prefill chunk (0 = each config's own)")
    p.add_argument("--press-ratio", type=float, default=0.5, help="kvpress SnapKV compression ratio")
    p.add_argument("--peer-python", default=sys.executable, help="interpreter for the kvpress / quanto rows")
    p.add_argument("--row-timeout", type=float, default=3600.0, help="seconds per row before it is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, 256 tokens, 4 decode tokens")
    p.add_argument("--out-dir", type=Path, default=None, help=f"default {RESULTS} ({SMOKE_DIR} with --smoke)")
    a = p.parse_args(argv)
    a.smoke = a.smoke or os.environ.get("SCALE_SMOKE") == "1"
    if a.smoke:
        a.lengths, a.decode_tokens, a.question_tokens = [256], 4, 16
        a.chunk_size = a.chunk_size or 64
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(NO_GPU)
    a.out_dir = a.out_dir or (SMOKE_DIR if a.smoke else RESULTS)
    skipped, keys = [], []
    for key in a.configs:
        _, params, needs = CONFIGS[key]
        python = a.peer_python if params["system"] in ("kvpress", "quanto") else sys.executable
        why = importable(python, needs) if needs else None
        if why:
            skipped.append(f"{label(key, a)} (`import {needs}` fails in {python}: {why})")
            print(f"[scale] skipping {label(key, a)}: {why}", file=sys.stderr)
        else:
            keys.append(key)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(a.lengths):
            for key in keys:
                python = a.peer_python if CONFIGS[key][1]["system"] in ("kvpress", "quanto") else sys.executable
                spec = {"name": label(key, a), "params": worker_params(key, a), "tokens": n, "seed": a.seed,
                        "decode_tokens": a.decode_tokens, "smoke": a.smoke,
                        "question_tokens": a.question_tokens if key == "prompt_guided" else 0,
                        "threads": 1 if a.smoke else None}
                print(f"[scale] {spec['name']} at {n} tokens", file=sys.stderr)
                rows.append({"key": key, **run_worker(spec, python, Path(tmp), a.row_timeout)})
    text = write_report(rows, a, skipped, argv)
    print(text)
    return rows


if __name__ == "__main__":
    main()

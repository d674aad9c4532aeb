"""Shared benchmark plumbing: compose an experiment, time prefills side by side, peak RSS in a fresh process.

``python -m benchmarks.common rss <experiment> <tokens> [override ...]`` is the child process used for
peak-memory rows: it loads the model, then measures the kernel's peak RSS (VmHWM, reset just before)
of one prefill of ``tokens`` WikiText-2 tokens, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def _head() -> str:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, check=False).stdout.strip()
    return (res.stdout.strip() or "?") + (" (+ uncommitted changes)" if dirty else "")


#: the code a benchmark ran: HEAD when it started (the header is written at the end)
START_COMMIT = _head()
CONF = REPO / "conf"


def compose(overrides: list[str]) -> Any:
    """Hydra compose of ``conf/config.yaml`` (no run dir, no logging setup)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def experiment_overrides(exp: str) -> list[str]:
    return [f"+experiment={exp}"]


def load(exp: str, extra: list[str] | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, compressor) for an experiment name (``full_cache`` = plain DynamicCache)."""
    from kvcomp.experiment import build_parts
    from kvcomp.model import load_model

    parts = build_parts(compose(experiment_overrides(exp) + list(extra or [])))
    model, tok = load_model(parts.model)
    return model, tok, parts.compressor


def wikitext_ids(tok: Any, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the bundled WikiText-2 test text, ``[1, n]``."""
    from kvcomp.data import wikitext2_text

    ids = tok(wikitext2_text()[: n * 8], add_special_tokens=False)["input_ids"][:n]
    if len(ids) < n:
        raise ValueError(f"WikiText-2 text gives only {len(ids)} tokens (< {n})")
    return torch.tensor([ids])


def timed_prefill(model: Any, compressor: Any, ids: torch.Tensor, question: torch.Tensor | None = None
                  ) -> tuple[float, dict[str, Any]]:
    """Seconds for one prefill (TTFT without the sampling step) and the cache statistics after it."""
    with compressor.session(model, question) as s:
        t0 = time.perf_counter()
        s.prefill(ids.to(next(model.parameters()).device))
        dt = time.perf_counter() - t0
    return dt, s.stats()


def rss_child(exp: str, tokens: int, extra: list[str]) -> dict[str, Any]:
    """Peak RSS above the loaded model (bytes) during one prefill, measured in this (fresh) process."""
    from kvcomp.profiler import MemoryProfiler

    model, tok, comp = load(exp, extra)
    ids = wikitext_ids(tok, tokens)
    timed_prefill(model, comp, ids[:, :64])  # warm up kernels / allocator outside the measurement
    with MemoryProfiler() as prof:
        dt, st = timed_prefill(model, comp, ids)
    r = prof.result
    return {"exp": exp, "tokens": tokens, "peak_above_weights": r["peak_rss_bytes"] - r["start_rss_bytes"],
            "prefill_s": dt, "kv_bytes": st["kv_bytes"], "chunk_size": comp.chunk_size}


def rss_in_subprocess(exp: str, tokens: int, extra: list[str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.common", "rss", exp, str(tokens), *(extra or [])]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def publish(out: Path, text: str) -> str:
    """Write a results file (creating its folder), print it, and return the text."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text


def header(title: str, argv: list[str]) -> str:
    """Markdown header: machine, versions, the command that produced the table."""
    import transformers

    cpu = platform.processor() or platform.machine()
    omp = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    return (f"# {title}\n\n"
            f"- command: `{omp}python -m {shlex.join(argv)}`\n"
            f"- machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"{platform.system()} {platform.release()}\n"
            f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, kvcomp commit {START_COMMIT} at the start\n"
            f"- date: {time.strftime('%Y-%m-%d %H:%M')}\n")


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``cols`` = (key, heading, format)."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---:" if f else "---" for _, _, f in cols) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for k, _, f in cols:
            v = r.get(k)
            cells.append("—" if v is None else (format(v, f) if f else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "rss":
        torch.set_grad_enabled(False)
        print(json.dumps(rss_child(sys.argv[2], int(sys.argv[3]), sys.argv[4:])))
    else:
        sys.exit("usage: python -m benchmarks.common rss <experiment> <tokens> [override ...]")

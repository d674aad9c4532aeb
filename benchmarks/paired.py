"""Paired comparison of finished run dirs (predictions.jsonl with per-sample ``score``) against a reference run.

    python -m benchmarks.paired REF_DIR NAME=DIR [NAME=DIR ...]
    python -m benchmarks.paired --ppl REF_DIR NAME=DIR [...]   # wikitext2_ppl runs (per-window nll_sum)

Per row: bytes ratio (fp16 / kv_bytes, mean over samples), score per subtask with a Wilson 95 % interval
(exact-match rates, n per subtask), and the score relative to the reference with a paired percentile
bootstrap 95 % interval (2000 resamples of the sample ids, seed 0). With ``--ppl``: PPL = exp(sum nll /
sum tokens) over the windows, and the PPL change vs the reference with a paired bootstrap over windows.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

from kvcomp.stats import interval


def load(d: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, Path(d, "predictions.jsonl").read_text().splitlines())}


def ratio_ci(ref: dict[str, Any], run: dict[str, Any], n_boot: int = 2000) -> tuple[float, float, float]:
    ids = sorted(set(ref) & set(run))
    rng = random.Random(0)
    point = sum(run[i]["score"] for i in ids) / max(1e-9, sum(ref[i]["score"] for i in ids))
    boots = []
    for _ in range(n_boot):
        s = [rng.choice(ids) for _ in ids]
        den = sum(ref[i]["score"] for i in s)
        if den:
            boots.append(sum(run[i]["score"] for i in s) / den)
    boots.sort()
    return point, boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]


def ppl(run: dict[str, Any], ids: list[str]) -> float:
    return math.exp(sum(run[i]["nll_sum"] for i in ids) / sum(run[i]["n_tokens"] for i in ids))


def ppl_table(argv: list[str]) -> str:
    ref = load(argv[0])
    lines = ["| configuration | fp16 bytes / kv_bytes | PPL (windows) | PPL vs reference [95 % CI] |",
             "|---|---:|---:|---:|"]
    rng = random.Random(0)
    for spec in ["reference=" + argv[0], *argv[1:]]:
        name, d = spec.split("=", 1)
        run = load(d)
        ids = sorted(set(ref) & set(run))
        kv = [r["kv_bytes_fp16"] / r["kv_bytes"] for r in run.values() if r.get("kv_bytes")]
        boots = sorted(ppl(run, s) / ppl(ref, s) - 1 for s in ([rng.choice(ids) for _ in ids] for _ in range(2000)))
        lines.append(f"| {name} | {sum(kv) / max(1, len(kv)):.2f} | {ppl(run, ids):.3f} ({len(ids)}) | "
                     f"{100 * (ppl(run, ids) / ppl(ref, ids) - 1):+.3f} % [{100 * boots[50]:+.3f}, "
                     f"{100 * boots[1949]:+.3f}] |")
    return "\n".join(lines)


def main(argv: list[str]) -> str:
    if argv and argv[0] == "--ppl":
        text = ppl_table(argv[1:])
        print(text)
        return text
    ref = load(argv[0])
    lines = ["| configuration | fp16 bytes / kv_bytes | passkey [95 % CI] (n) | needle [95 % CI] (n) | score vs "
             "reference [95 % CI] |", "|---|---:|---:|---:|---:|"]
    for spec in ["reference=" + argv[0], *argv[1:]]:
        name, d = spec.split("=", 1)
        run = load(d)
        kv = [r["kv_bytes_fp16"] / r["kv_bytes"] for r in run.values() if r.get("kv_bytes")]
        cells = []
        for sub in ("passkey", "needle"):
            rs = [r for i, r in run.items() if i.startswith(sub)]
            iv = interval([r["score"] for r in rs], scale=100.0)  # Wilson: exact-match rates
            if iv["n"]:
                cells.append(f"{iv['mean']:.1f} [{iv['low']:.1f}, {iv['high']:.1f}] ({iv['n']})")
            else:
                cells.append("0.0 [0.0, 0.0] (0)")
        p, lo, hi = ratio_ci(ref, run)
        lines.append(f"| {name} | {sum(kv) / max(1, len(kv)):.2f} | {cells[0]} | {cells[1]} | "
                     f"{100 * p:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])

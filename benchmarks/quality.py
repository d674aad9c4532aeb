"""Quality rows for the benchmark tables: run a configuration into its own run dir (resumable), read its
per-sample records back, and format ``value ± half-width (n)`` cells and paired differences between rows.

A row's run dir holds ``metrics.json`` + ``predictions.jsonl`` as any run; with ``resume`` a finished row is
read back instead of rerun, so a long benchmark killed half way only reruns the missing rows.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import compose
from kvcomp.stats import fmt, paired

MARK = "*"  # the difference's 95 % interval excludes 0


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name).strip("_")


def run_row(name: str, overrides: list[str], out_root: Path, resume: bool = True
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-sample records of one configuration, run into ``out_root/<name>``."""
    from kvcomp.experiment import run

    out = out_root / slug(name)
    if resume and (out / "metrics.json").exists():
        print(f"  {name}: read back from {out}", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        m = run(compose(overrides), out)
        m["wall_s"] = time.perf_counter() - t0
        (out / "metrics.json").write_text(json.dumps(m, indent=2, default=float))
        (out / "overrides.json").write_text(json.dumps(overrides))
    m = json.loads((out / "metrics.json").read_text())
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines() if x.strip()]
    return m, recs


def pair(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str, group: str | None = None,
         scale: float = 1.0) -> dict[str, Any]:
    """Paired difference ``a - b`` of per-sample ``key`` over the samples both rows ran (matched by id)."""
    bid = {r["id"]: r for r in b}
    ps = [(r[key], bid[r["id"]][key]) for r in a
          if r["id"] in bid and (group is None or r.get("subtask") == group)
          and r.get(key) is not None and bid[r["id"]].get(key) is not None]
    return paired([x for x, _ in ps], [y for _, y in ps], scale=scale)


def diff_cell(d: dict[str, Any], spec: str = "+.1f") -> str:
    """``+x.x [lo, hi]*``: a paired difference with its interval; ``*`` when the interval excludes 0."""
    if not d or d.get("mean") is None:
        return "—"
    return (f"{format(d['mean'], spec)} [{format(d['low'], spec)}, {format(d['high'], spec)}]"
            f"{MARK if d['significant'] else ''}")


def verdict(d: dict[str, Any], higher_is_better: bool = True) -> str:
    if not d or d.get("mean") is None:
        return "—"
    if not d["significant"]:
        return "indistinguishable"
    return "better" if (d["mean"] > 0) == higher_is_better else "worse"


def ci_cell(m: dict[str, Any], key: str, spec: str = ".1f") -> str:
    return fmt(m.get("ci", {}).get(key), spec)

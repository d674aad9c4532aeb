"""Where the stage schedule's selections put the answer's tokens, sample by sample (``prompt_guided`` rows).

For every passkey / needle sample of the offline suite it runs ``+experiment=prompt_guided`` with the given
overrides (greedy, no fidelity), records at each selection point how many of the answer's tokens (the
passkey / the needle's number, first occurrence in the prompt) and of the 10 tokens before them were carried
on, and the rank quantile (0 = lowest, 1 = highest among the carried tokens) of the answer's best token under
each term of the scorer alone (A: the question's attention, b: b_pos, r: key relevance), under the scorer's
score and under the accumulated score the selection ranks by. Prints one JSON line per sample and a summary:

    OMP_NUM_THREADS=1 python -m benchmarks.propagation_trace --context 1000 --samples 30 \\
        --out outputs/trace_end.jsonl compressor.question=end

Analysis only: it reads the propagator's selection by wrapping that one instance's ``select`` and its scorer's
``score`` for the run (nothing is patched at import, nothing in kvcomp/ changes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import compose

TERMS = {"A": {"beta": 0.0, "gamma": 0.0}, "b": {"alpha": 0.0, "gamma": 0.0}, "r": {"alpha": 0.0, "beta": 0.0}}


def answer_span(tok: Any, ids: list[int], answer: str) -> list[int]:
    """Token indices covering the first occurrence of ``answer`` in the decoded prompt."""
    offs, text = [], ""
    for t in ids:
        offs.append(len(text))
        text += tok.decode([t])
    offs.append(len(text))
    at = text.find(answer)
    if at < 0:
        return []
    return [i for i in range(len(ids)) if offs[i] < at + len(answer) and offs[i + 1] > at]


def quantile(x: torch.Tensor, idx: list[int]) -> float | None:
    """Share of the entries of ``x`` below the best of ``x[idx]``."""
    return round(float((x < x[idx].max()).float().mean()), 3) if idx else None


class Recorder:
    """Wraps one propagator's ``select`` to record each selection's positions, kept indices and scores."""

    def __init__(self, prop: Any) -> None:
        self.points: list[dict[str, Any]] = []
        self.inner = prop.select
        prop.select = self.select

    def select(self, run: Any, layer: int, *args: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        scorer, got = run.scoring.scorer, {}
        real = scorer.score

        def score(ctx: Any) -> torch.Tensor:
            out = real(ctx)
            got["s"] = out.float()
            for name, zero in TERMS.items():
                got[name] = dataclasses.replace(scorer, **zero).score(ctx).float()
            return out

        scorer.score = score
        try:
            keep, acc = self.inner(run, layer, *args, **kw)
        finally:
            del scorer.score
        pos, acc_in = args[4], args[7]
        total = got["s"] + (acc_in if acc_in is not None else 0)
        self.points.append({"layer": layer, "pos": pos.clone(), "keep": keep.clone(), "acc": total, **got})
        return keep, acc


def trace(context: int, samples: int, overrides: list[str], out: Path | None) -> list[dict[str, Any]]:
    from kvcomp.engine import stop_ids
    from kvcomp.generation import greedy_generate
    from kvcomp.model.loader import load_model
    from kvcomp.plan import build_parts

    parts = build_parts(compose(["+experiment=prompt_guided", "task=offline_suite", f"task.context_length={context}",
                                 f"task.n_samples={samples}", "task.subtasks=[passkey,needle]", *overrides]))
    model, tok = load_model(parts.model)
    comp, rec = parts.compressor, Recorder(parts.compressor.propagator)
    stops, rows = stop_ids(model, tok), []
    for smp in parts.task.samples(tok):
        span = answer_span(tok, smp.prompt_ids, smp.answers[0])
        key = list(range(max(0, span[0] - 10), span[0])) if span else []
        rec.points.clear()
        q = torch.tensor([smp.question_ids]) if smp.question_ids else None
        with comp.session(model, q) as s:
            gen = greedy_generate(s, torch.tensor([smp.prompt_ids]), smp.max_new_tokens, stops)
        pred = tok.decode(gen.tokens, skip_special_tokens=True)
        row = {"id": smp.id, "score": parts.task.score(smp, pred), "prediction": pred[:24], "span": span,
               "points": [], "survive": [], "key_survive": [], "ranks": []}
        for p in rec.points:
            pos = p["pos"].tolist()
            kept = set(p["pos"][p["keep"]].tolist())
            idx = [pos.index(i) for i in span if i in pos]
            row["points"].append(p["layer"])
            row["survive"].append(sum(i in kept for i in span))
            row["key_survive"].append(sum(i in kept for i in key))
            row["ranks"].append({t: quantile(p[t], idx) for t in ("A", "b", "r", "s", "acc")})
        print(json.dumps(row), flush=True)
        rows.append(row)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    lines = []
    for sub in ("passkey", "needle"):
        rs = [r for r in rows if r["id"].startswith(sub)]
        if not rs:
            continue
        lost = [r for r in rs if r["span"] and r["survive"] and r["survive"][-1] < len(r["span"])]
        first = {}
        for r in lost:
            at = next(p for p, n in zip(r["points"], r["survive"], strict=True) if n < len(r["span"]))
            first[at] = first.get(at, 0) + 1
        lines.append(f"{sub}: score {100 * sum(r['score'] for r in rs) / len(rs):.1f} (n = {len(rs)}); answer not "
                     f"carried whole in {len(lost)} (first lost after layer: {first}), of which wrong "
                     f"{sum(r['score'] == 0 for r in lost)}; wrong with the answer carried whole "
                     f"{sum(r['score'] == 0 for r in rs if r not in lost)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--samples", type=int, default=30, help="per subtask")
    p.add_argument("--out", type=Path, default=None, help="per-sample JSON lines")
    p.add_argument("overrides", nargs="*", help="Hydra overrides on +experiment=prompt_guided")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    text = summary(trace(a.context, a.samples, a.overrides, a.out))
    print(text)
    return text


if __name__ == "__main__":
    main()

"""Why ``h2o`` at keep 0.5 loses the passkey: which tokens its budget keeps, per scoring variant (SmolLM2-135M).

For passkey samples at ``--context`` tokens, each configuration prefills the prompt (chunks of 512) and the
cache is read back: per layer, the share held of (a) the prompt's last ``--tail`` tokens (question + chat
template), (b) the passkey's digit tokens, (c) each chunk's first and second half; then the greedy answer is
scored (exact key). Means over layers and samples, with the answer rate's Wilson interval.

    OMP_NUM_THREADS=1 python -m benchmarks.h2o_bias --samples 10
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from kvcomp.stats import interval

CONFIGS: dict[str, list[str]] = {
    "h2o (sum, per chunk)": [],
    "h2o normalize=mean (per chunk)": ["scorer.normalize=mean"],
    "h2o budget_at=end (sum)": ["compressor.precision.budget_at=end", "quantizer=uniform", "quantizer.key_bits=16",
                                "quantizer.value_bits=16", "quantizer.pre_rope=false"],
    "h2o normalize=mean, budget_at=end": ["scorer.normalize=mean", "compressor.precision.budget_at=end",
                                          "quantizer=uniform", "quantizer.key_bits=16", "quantizer.value_bits=16",
                                          "quantizer.pre_rope=false"],
}


def key_positions(tok: Any, ids: list[int], key: str) -> list[int]:
    """Positions of the passkey's tokens: the first place its tokenization (with or without a leading space)
    occurs in the prompt."""
    for text in (" " + key, key):
        sub = tok(text, add_special_tokens=False)["input_ids"]
        for i in range(len(ids) - len(sub) + 1):
            if ids[i : i + len(sub)] == sub:
                return list(range(i, i + len(sub)))
    return []


def shares(cache: Any, t: int, tail: int, key_pos: torch.Tensor, chunk: int) -> dict[str, float]:
    out: dict[str, list[float]] = {"tail": [], "key": [], "first half": [], "second half": []}
    for layer in cache.layers:
        held = layer.held_positions().long()
        held = held[held < t]
        mask = torch.zeros(t, dtype=torch.bool)
        mask[held] = True
        off = torch.arange(t) % chunk
        out["tail"].append(float(mask[t - tail :].float().mean()))
        out["key"].append(float(mask[key_pos].float().mean()) if key_pos.numel() else float("nan"))
        out["first half"].append(float(mask[off < chunk // 2].float().mean()))
        out["second half"].append(float(mask[off >= chunk // 2].float().mean()))
    return {k: sum(v) / len(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--tail", type=int, default=40)
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    from benchmarks.common import compose
    from kvcomp.engine import stop_ids
    from kvcomp.experiment import build_parts
    from kvcomp.generation import greedy_generate
    from kvcomp.model import load_model

    rows = []
    for name, extra in CONFIGS.items():
        cfg = compose(["+experiment=h2o", "task=passkey", f"task.context_length={a.context}",
                       f"task.n_samples={a.samples}", *extra])
        parts = build_parts(cfg)
        model, tok = load_model(parts.model)
        task, comp, stops = parts.task, parts.compressor, stop_ids(model, tok)
        acc: dict[str, float] = {}
        hits, t0 = [], time.time()
        samples = task.samples(tok)
        for s in samples:
            ids = torch.tensor([s.prompt_ids])
            digits = key_positions(tok, s.prompt_ids, s.answers[0])
            with comp.session(model, torch.tensor([s.question_ids])) as sess:
                gen = greedy_generate(sess, ids, s.max_new_tokens, stops)
                sh = shares(sess.cache, ids.shape[1], a.tail, torch.tensor(digits, dtype=torch.long), 512)
            for k, v in sh.items():
                acc[k] = acc.get(k, 0.0) + v / len(samples)
            toks = [x for x in gen.tokens if x not in stops]
            hits.append(float(task.score(s, tok.decode(toks, skip_special_tokens=True)) > 0))
        iv = interval(hits)
        rows.append((name, acc, sum(hits), len(samples), iv["low"], iv["high"], time.time() - t0))
    print(f"passkey at {a.context} tokens, h2o keep_ratio 0.5, chunks of 512, torch threads "
          f"{torch.get_num_threads()}\n")
    print(f"| configuration | held: last {a.tail} tokens | held: the key | held: chunk 1st half | held: chunk 2nd "
          "half | passkey [95 % CI] (n) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, sh, hits, n, lo, hi, _ in rows:
        print(f"| {name} | {sh['tail']:.2f} | {sh['key']:.2f} | {sh['first half']:.2f} | {sh['second half']:.2f} | "
              f"{100 * hits / n:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] ({n}) |")


if __name__ == "__main__":
    main()

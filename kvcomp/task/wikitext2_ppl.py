"""``task=wikitext2_ppl``: perplexity on non-overlapping WikiText-2 windows, prefilled chunk by chunk.

Each window of ``seq_len`` tokens starts a fresh cache and goes through the compressor's chunked prefill,
so tokens in later chunks are predicted from *compressed* history. The first token of each window is
unscored. ``ppl = exp(nll)``, ``nll`` = mean negative log-likelihood (nats/token); ``score`` = next-token
top-1 accuracy in % (a 0-100 quality number; optimise ``objective=ppl`` with direction minimize).
The text is the WikiText-2 raw test file as is (see kvcomp/data), or the hub's ``wikitext-2-raw-v1``
test rows rebuilt into that same file (``source: hub``).

``mode: continuation``: each sample is ``seq_len`` context tokens prefilled through the cache, then the next
``continuation_tokens`` are teacher-forced one decode step each; ``nll``/``ppl``/``score`` are over those
tokens only (what a compressed prompt does to what comes after it), and with ``fidelity: true`` each sample
also gets ``answer_nll``, ``kl_full`` and ``top1_agree`` against the full cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from kvcomp.fields import param
from kvcomp.generation import Generation
from kvcomp.profiler import MemoryProfiler, Timer
from kvcomp.registry import TASKS
from kvcomp.task.base import Sample, Task, span

SOURCES = ("bundled", "hub")
MODES = ("ppl", "continuation")


def wikitext2_test(source: str = "bundled") -> str:
    """The raw test text. ``hub`` rebuilds the file from the dataset rows (empty row -> ' \\n')."""
    if source == "bundled":
        from kvcomp.data import wikitext2_text

        return wikitext2_text()
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    return "".join(r if r else " \n" for r in rows)


@lru_cache(maxsize=2)
def _token_ids(tokenizer: Any, source: str) -> tuple[int, ...]:
    return tuple(tokenizer(wikitext2_test(source), add_special_tokens=False)["input_ids"])


@TASKS.register("wikitext2_ppl")
@dataclass
class WikiText2PPL(Task):
    """``seq_len`` tokens per window, first ``max_windows`` windows (0 = all)."""

    seq_len: int = param(1024, ge=2)
    max_windows: int = param(64, ge=0)
    source: str = param("bundled", choices=SOURCES)
    mode: str = param("ppl", choices=MODES)
    continuation_tokens: int = param(32, ge=1)

    def positions_needed(self) -> tuple[int, str] | None:
        if self.mode == "continuation":
            return span(("task.seq_len", self.seq_len), ("task.continuation_tokens", self.continuation_tokens))
        return span(("task.seq_len", self.seq_len))

    def samples(self, tokenizer: Any) -> list[Sample]:
        ids = _token_ids(tokenizer, self.source)
        if self.mode == "continuation":
            w, c = self.seq_len + self.continuation_tokens, self.continuation_tokens
            n = len(ids) // w if not self.max_windows else min(len(ids) // w, self.max_windows)
            return [Sample(id=f"window-{i}", prompt_ids=list(ids[i * w : i * w + self.seq_len]), answers=[],
                           target_ids=list(ids[i * w + self.seq_len : (i + 1) * w]), max_new_tokens=c)
                    for i in range(n)]
        n = len(ids) // self.seq_len
        if self.max_windows:
            n = min(n, self.max_windows)
        return [
            Sample(id=f"window-{i}", prompt_ids=list(ids[i * self.seq_len : (i + 1) * self.seq_len]), answers=[])
            for i in range(n)
        ]

    def run_sample(self, engine: Any, sample: Sample) -> dict[str, Any]:
        if self.mode == "continuation":
            return self._continuation(engine, sample)
        model, comp = engine.model, engine.compressor
        ids = torch.tensor([sample.prompt_ids], device=engine.device)
        nll = torch.zeros((), dtype=torch.float64)
        correct = 0

        def on_logits(logits: torch.Tensor, start: int) -> None:
            nonlocal nll, correct
            q = logits.shape[1]
            tgt = ids[0, start + 1 : start + q + 1]
            lg = logits[0, : tgt.numel()].float()
            nll += torch.nn.functional.cross_entropy(lg, tgt, reduction="sum").double().cpu()
            correct += int((lg.argmax(-1) == tgt).sum())

        with comp.session(model) as s, MemoryProfiler(device=engine.device) as prof, Timer(engine.device) as t:
            s.prefill(ids, on_logits=on_logits)
        gen = Generation([], ids.shape[1], t.s, 0.0, prof.result, s.stats())
        n = ids.shape[1] - 1
        rec = {"id": sample.id, "prompt_len": ids.shape[1], "nll_sum": float(nll), "n_tokens": n,
               "correct": correct, "score": correct / n}
        rec.update(engine.perf_record(gen))
        rec.pop("tokens_per_s")
        rec["prefill_tokens_per_s"] = ids.shape[1] / t.s if t.s > 0 else 0.0
        return rec

    def _continuation(self, engine: Any, sample: Sample) -> dict[str, Any]:
        target = list(sample.target_ids or [])
        logp, gen = engine.teacher_forced(sample.prompt_ids, target)
        tgt = torch.tensor(target)
        nll = float(-logp.gather(1, tgt[:, None]).double().sum())
        correct = int((logp.argmax(-1) == tgt).sum())
        rec = {"id": sample.id, "prompt_len": len(sample.prompt_ids), "nll_sum": nll, "n_tokens": len(target),
               "correct": correct, "score": correct / len(target)}
        rec.update(engine.perf_record(gen))
        rec.pop("tokens_per_s")
        if self.fidelity:
            rec.update(self.compare(engine, sample.prompt_ids, target, logp))
        return rec

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = sum(r["n_tokens"] for r in records)
        nll = sum(r["nll_sum"] for r in records) / tokens if tokens else float("nan")
        return {
            "score": round(100.0 * sum(r["correct"] for r in records) / tokens, 2) if tokens else 0.0,
            "nll": nll,
            "ppl": math.exp(nll),
            "n_tokens": tokens,
            "tokens_per_s": sum(r["prompt_len"] for r in records) / sum(r["ttft_s"] for r in records),
        }

"""Greedy decoding of one prompt through a ``Session`` (its chunked prefill, then one token at a time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvcomp.profiler import MemoryProfiler, Timer


@dataclass
class Generation:
    """Result of one prompt: generated token ids and the performance numbers of its run."""

    tokens: list[int]
    prompt_len: int
    ttft_s: float
    decode_s: float
    memory: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    #: with ``teacher_ids``: log-probs [m, V] of the next token at each teacher-forced answer position
    forced: torch.Tensor | None = None

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first, per second of decoding."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@torch.inference_mode()
def greedy_generate(session: Any, input_ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int],
                    min_new_tokens: int = 0, teacher_ids: list[int] | None = None) -> Generation:
    """Greedy decoding after the ``session``'s chunked prefill. TTFT = prefill + first token; memory = during
    prefill. With ``min_new_tokens`` >= 1 the first token is never a stop token (their logits are masked).
    With ``teacher_ids``, the cache state after the prefill is kept (outside the timers) and, after decoding,
    restored to teacher-force those ids one decode step each (``Generation.forced``)."""
    from kvcomp import fidelity

    device = input_ids.device
    with MemoryProfiler(device=device) as prof, Timer(device) as t_first:
        logits = session.prefill(input_ids)
        first = logits
        if min_new_tokens > 0 and stop_ids:
            logits = logits.clone()
            logits[:, sorted(stop_ids)] = float("-inf")
        nxt = logits.argmax(-1)
    stats = session.stats()
    state = fidelity.snapshot(session.cache) if teacher_ids else None
    tokens = [int(nxt[0])]
    with Timer(device) as t_dec:
        while len(tokens) < max_new_tokens and tokens[-1] not in stop_ids:
            nxt = session.step(nxt[:, None]).argmax(-1)
            tokens.append(int(nxt[0]))
    forced = None
    if state is not None and teacher_ids:
        fidelity.restore(session.cache, state)
        forced = fidelity.teacher_force(session.model, session.cache, first, teacher_ids)
    return Generation(tokens, input_ids.shape[1], t_first.s, t_dec.s, prof.result, stats, forced)

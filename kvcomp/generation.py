"""Chunked real-time prefill and greedy decoding on any transformers causal LM with a given cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcomp.cache import cache_stats
from kvcomp.profiler import MemoryProfiler, Timer, release_memory

#: called with (logits [B, q, V] of one chunk, start offset of the chunk); lets a task score tokens
LogitsFn = Callable[[torch.Tensor, int], None]


@torch.inference_mode()
def prefill(
    model: Any,
    cache: Any,
    input_ids: torch.Tensor,
    chunk_size: int = 0,
    on_logits: LogitsFn | None = None,
) -> torch.Tensor:
    """Run ``input_ids`` [B, T] through ``model`` chunk by chunk into ``cache``; return last logits [B, V].

    Each chunk attends to the (compressed) history already in ``cache`` plus its own tokens. Logits are
    computed only for the last position unless ``on_logits`` wants every position (perplexity). When the
    cache has ``guide_ids`` (a question), they are appended to every non-final chunk so a prompt-guided
    scorer sees the question's queries; the cache never stores their K/V.
    """
    t = input_ids.shape[1]
    step = chunk_size if chunk_size and chunk_size > 0 else t
    guide = getattr(cache, "guide_ids", None)
    if hasattr(cache, "prompt_len"):
        cache.prompt_len = t
    last = None
    for start in range(0, t, step):
        chunk = input_ids[:, start : start + step]
        keep = 0 if on_logits is not None else 1  # 0 = all positions
        if guide is not None and start + step < t:  # Finch-style: the question guides every chunk
            chunk = torch.cat([chunk, guide.to(chunk.device)], dim=1)
            cache.guide_appended = guide.shape[1]
        out = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        if guide is not None:
            cache.guide_appended = 0
        if on_logits is not None:
            if out.logits.shape[1] != chunk.shape[1]:
                from kvcomp.errors import ConfigError

                raise ConfigError("this task scores every position, but propagation dropped hidden states; "
                                  "use propagation=none with it")
            on_logits(out.logits, start)
        last = out.logits[:, -1, :]
        del out
        if step < t:
            release_memory(input_ids.device)
    assert last is not None, "empty input"
    scoring = getattr(cache, "scoring", None)
    if scoring is not None:  # the prompt has been read: a late (question: end) pass may re-tier the history
        scoring.prompt_end(cache)
    return last


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
def greedy_generate(
    model: Any,
    cache: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    stop_ids: set[int],
    chunk_size: int = 0,
    min_new_tokens: int = 0,
    teacher_ids: list[int] | None = None,
) -> Generation:
    """Greedy decoding after a chunked prefill. TTFT = prefill + first token; memory = during prefill.
    With ``min_new_tokens`` >= 1 the first token is never a stop token (their logits are masked).
    With ``teacher_ids``, the cache state after the prefill is kept (outside the timers) and, after decoding,
    restored to teacher-force those ids one decode step each (``Generation.forced``)."""
    from kvcomp import fidelity

    device = input_ids.device
    with MemoryProfiler(device=device) as prof, Timer(device) as t_first:
        logits = prefill(model, cache, input_ids, chunk_size)
        first = logits
        if min_new_tokens > 0 and stop_ids:
            logits = logits.clone()
            logits[:, sorted(stop_ids)] = float("-inf")
        nxt = logits.argmax(-1)
    stats = cache_stats(cache)
    state = fidelity.snapshot(cache) if teacher_ids else None
    tokens = [int(nxt[0])]
    with Timer(device) as t_dec:
        while len(tokens) < max_new_tokens and tokens[-1] not in stop_ids:
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1, :].argmax(-1)
            tokens.append(int(nxt[0]))
    forced = None
    if state is not None and teacher_ids:
        fidelity.restore(cache, state)
        forced = fidelity.teacher_force(model, cache, first, teacher_ids)
    return Generation(tokens, input_ids.shape[1], t_first.s, t_dec.s, prof.result, stats, forced)

"""One prompt's run: the cache, the hooks, the chunking, the question and every per-prompt state.

    with compressor.session(model, question_ids) as s:
        last_logits = s.prefill(ids, on_logits)        # chunked real-time prefill
        logits = s.step(next_ids)                      # one decode step
    s.stats()                                          # cache statistics after the run

On entry the session builds a fresh cache (``compressor.new_cache``) and installs the compressor's hooks
for this model instance (``compressor.install(self)``: scorer glue, propagation hooks, the packed-cache
attention function); on exit it removes them. A compressed cache's layers ask the session, through the
narrow ``kvcomp.cache.RunHooks`` interface, for the positions of a forward's tokens, how many trailing
tokens are a guide (never stored), the importance of the tokens they store and the bits per token; the
propagator reads the same state (layer scores, pending positions) from the session, not from the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from kvcomp.profiler import release_memory

#: called with (logits [B, q, V] of one chunk, start offset of the chunk); lets a task score tokens
LogitsFn = Callable[[torch.Tensor, int], None]


class Session:
    """A fresh cache and this compressor's hooks on ``model`` for one prompt (``question_ids`` ``[1, Q]`` or None).

    Per-prompt state: ``question_ids``, ``guide_ids`` (the question when the scorer wants it appended to every
    non-final prefill chunk), ``prompt_len``, ``guide_appended`` (guide tokens in the current forward),
    ``pending_positions`` (absolute positions a propagator set for a layer's next tokens), ``layer_scores``
    (importance of the tokens each layer stored in the current forward) and ``scoring`` (scorer glue)."""

    def __init__(self, compressor: Any, model: Any, question_ids: torch.Tensor | None = None) -> None:
        self.compressor, self.model = compressor, model
        self.question_ids = question_ids
        self.question_len = 0 if question_ids is None else int(question_ids.shape[-1])
        self.chunk_size = int(compressor.chunk_size)
        self.guide_ids: torch.Tensor | None = None
        self.prompt_len = 0
        self.guide_appended = 0
        self.pending_positions: dict[int, torch.Tensor] = {}
        self.step_positions: torch.Tensor | None = None
        self.layer_scores: dict[int, torch.Tensor] = {}
        self.scoring: Any = None
        self.policy: Any = None
        self.deferred = False  # True while the model's attention reads the cache (kernels/interface.py)
        self.schedule: Any = None  # propagation.schedule=stage: drives prefill (kvcomp/propagator/stage.py)
        self.cache: Any = None
        self._stack: ExitStack | None = None

    def __enter__(self) -> Session:
        if self._stack is not None:
            raise RuntimeError("this session is already active")
        self.cache = self.compressor.new_cache(self.model)
        if hasattr(self.cache, "bind"):
            self.cache.bind(self)
        self._stack = ExitStack()
        try:
            self.compressor.install(self, self._stack)
        except BaseException:
            self._stack.close()
            self._stack = None
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # -- running the model ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, on_logits: LogitsFn | None = None) -> torch.Tensor:
        """Run ``input_ids`` [B, T] chunk by chunk into the cache; return the last logits [B, V].

        Each chunk attends to the (compressed) history plus its own tokens. Logits are computed only for the
        last position unless ``on_logits`` wants every position (perplexity). ``guide_ids`` (a question) are
        appended to every non-final chunk so a prompt-guided scorer sees the question's queries; the cache
        never stores their K/V. With a stage schedule (``propagation.schedule: stage``) the schedule drives the
        prefill instead: each stage of layers takes the whole prompt (its carried tokens) before the next."""
        if self.schedule is not None:
            return self._staged(input_ids, on_logits)
        t = input_ids.shape[1]
        step = self.chunk_size if self.chunk_size > 0 else t
        self.prompt_len = t
        guide = self.guide_ids
        last = None
        none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        for start in range(0, t, step):
            chunk = input_ids[:, start : start + step]
            # 0 = every position (a task scores them); else the last position of the last chunk only: earlier chunks'
            # logits are never read, so they skip the vocabulary projection, as an unchunked prefill does
            keep: int | torch.Tensor = 0 if on_logits is not None else (1 if start + step >= t else none)
            if guide is not None and start + step < t:  # Finch-style: the question guides every chunk
                chunk = torch.cat([chunk, guide.to(chunk.device)], dim=1)
                self.guide_appended = guide.shape[1]
            out = self.model(input_ids=chunk, past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
            self.guide_appended = 0
            if on_logits is not None:
                if out.logits.shape[1] != chunk.shape[1]:
                    from kvcomp.errors import ConfigError

                    raise ConfigError("this task scores every position, but propagation dropped hidden states; "
                                      "use propagation=none with it")
                on_logits(out.logits, start)
            if out.logits.shape[1]:
                last = out.logits[:, -1, :]
            del out
            if step < t:
                release_memory(input_ids.device)
        if last is None:
            raise ValueError("empty input")
        self._prompt_read()
        return last

    def _prompt_read(self) -> None:
        """The prompt has been read: a late (question: end) pass may re-tier it, then the cache drops what its
        prefill forwards memoised (``end_prefill``; a plain HF cache has none)."""
        if self.scoring is not None:
            self.scoring.prompt_end(self)
        if hasattr(self.cache, "end_prefill"):
            self.cache.end_prefill()

    def _staged(self, input_ids: torch.Tensor, on_logits: LogitsFn | None) -> torch.Tensor:
        if on_logits is not None:
            from kvcomp.errors import ConfigError

            raise ConfigError("this task scores every position, but propagation drops hidden states; "
                              "use propagation=none with it")
        self.prompt_len = input_ids.shape[1]
        last = self.schedule.prefill(input_ids)
        self._prompt_read()
        return last

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode forward of ``input_ids`` [B, 1]; returns its logits [B, V]."""
        return self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True).logits[:, -1, :]

    def stats(self) -> dict[str, Any]:
        """Statistics of the cache (``kvcomp.cache.cache_stats``)."""
        from kvcomp.cache import cache_stats

        stats = cache_stats(self.cache)
        if self.schedule is not None:  # peak bytes of the stage boundary's hidden states + selection keys
            stats["stage_boundary_bytes"] = int(self.schedule.boundary_bytes)
        return stats

    # -- kvcomp.cache.RunHooks: what a compressed cache's layers ask of the run -----------------------
    def take_positions(self, layer_idx: int, seen: int, q: int, device: torch.device) -> torch.Tensor:
        """Absolute positions [q] of the tokens a layer receives in this forward."""
        pos = self.pending_positions.pop(layer_idx, None)
        if pos is None:
            # layer 0 sees every token, so its count is absolute; later layers reuse its positions for this
            # forward (after propagation dropped tokens, their own count is smaller than the sequence)
            step = self.step_positions
            if layer_idx == 0 or step is None or step.numel() != q:
                step = torch.arange(seen, seen + q, device=device)
                if layer_idx == 0:
                    self.step_positions = step
            return step.to(device)
        if pos.numel() != q:
            raise RuntimeError(f"layer {layer_idx}: {pos.numel()} pending positions for {q} new tokens")
        return pos.to(device)

    def score(self, layer_idx: int, new_keys: torch.Tensor, positions: torch.Tensor, n_store: int,
              attn: tuple[torch.Tensor, torch.Tensor, float] | None) -> torch.Tensor | None:
        """Importance [n_store] of the stored new tokens (None without a scorer or during decode). ``attn``:
        (post-RoPE queries ``[B, Hq, q, D]``, their log-sum-exp over everything they attended to, the softmax scale)."""
        if self.schedule is not None:
            self.schedule.observe(layer_idx, new_keys, n_store, attn)
        if self.scoring is None or new_keys.shape[-2] == 1:
            return None
        s = self.scoring.score(self.cache, layer_idx, new_keys, positions, n_store, attn, self.prompt_len)
        self.layer_scores[layer_idx] = s
        return s

    def token_bits(self, layer_idx: int, scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
        return None if self.policy is None else self.policy(scores, pos, self.prompt_len, layer_idx,
                                                             len(self.cache.layers))

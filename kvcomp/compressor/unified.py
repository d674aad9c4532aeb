"""``compressor=unified``: compressed cache + chunked real-time prefill, composed from pluggable parts.

scorer (token importance, while prefill runs) + precision policy (scores -> bits or drop) + quantizer
(how tokens are stored) + propagator (which tokens reach later layers). Each is switched off with
``none`` (precision: ``mode: none``), so a component ablation is a pure config change. Parts talk
through small interfaces only: the scorer declares the queries it needs and whether the question guides
each chunk; the cache asks ``scoring.score(...)`` and ``policy(...)``; the propagator reads
``cache.layer_scores``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kvcomp.cache import CompressedCache
from kvcomp.compressor.base import Compressor
from kvcomp.compressor.precision import Precision
from kvcomp.compressor.timing import prompt_end, say_once
from kvcomp.errors import ConfigError
from kvcomp.fields import bind
from kvcomp.model import arch
from kvcomp.registry import COMPRESSORS
from kvcomp.scorer.base import ScoreContext


class Scoring:
    """Per-sequence glue between the cache and a scorer: holds the queries captured from each layer's query
    source (``kvcomp.model.arch.query_source``: ``q_norm``, ``q_proj`` or a fused projection's query slice)."""

    def __init__(self, scorer: Any, model: Any, window: int) -> None:
        self.scorer = scorer
        self.window = window  # trailing queries to keep (-1 = all)
        attns = [arch.attention(model, layer) for layer in arch.decoder_layers(model)]
        self.n_layers = len(attns)
        #: per layer: the attention's own softmax scale (Gemma: query_pre_attn_scalar), else 1/sqrt(head_dim)
        self.scalings = [getattr(a, "scaling", None) for a in attns]
        self.sources = [arch.query_source(model, a) for a in attns]
        self.windows = arch.windows(model)
        self.queries: dict[int, torch.Tensor] = {}
        self.last_queries: dict[int, torch.Tensor] = {}  # post-RoPE trailing queries of each layer's last forward
        self.end_pass: Any = None  # question: end -- called once the prompt has been read

    def q_hook(self, layer_idx: int) -> Any:
        select = self.sources[layer_idx][1]

        def hook(module: Any, args: tuple, out: torch.Tensor) -> None:
            if self.window == 0:
                return
            out = select(args[0], out)  # [B, T, H_q * D]
            if out.shape[1] > 1:  # prefill only
                self.queries[layer_idx] = out if self.window < 0 else out[:, -self.window :]
        return hook

    def score(self, cache: CompressedCache, layer_idx: int, keys: torch.Tensor, new_keys: torch.Tensor,
              positions: torch.Tensor, n_store: int) -> torch.Tensor:
        q, d = new_keys.shape[-2], new_keys.shape[-1]
        if n_store == 0:  # only an appended question reached this layer (propagation stopped the chunk)
            self.queries.pop(layer_idx, None)
            return torch.zeros(0, device=new_keys.device)
        rope = cache.ropes[layer_idx]
        pre = rope.invert(new_keys, positions) if rope is not None else new_keys
        raw = self.queries.pop(layer_idx, None)  # [B, W, H_q * D] pre-RoPE
        queries = None
        if raw is not None:
            b, w, _ = raw.shape
            w = min(w, q)
            qh = raw[:, -w:].reshape(b, w, -1, d).transpose(1, 2)
            queries = rope.apply(qh, positions[-w:]) if rope is not None else qh.float()
            self.last_queries[layer_idx] = queries
        scaling = self.scalings[layer_idx] or d**-0.5
        ctx = ScoreContext(layer_idx, self.n_layers, keys, pre, queries, positions, n_store,
                           keys.shape[-2] - q, scaling, int(getattr(cache, "prompt_len", 0)),
                           cache.layers[layer_idx].held_positions(), self.windows[layer_idx])
        s = self.scorer.score(ctx).float()
        return torch.nan_to_num(s, nan=0.0)

    def prompt_end(self, cache: CompressedCache) -> None:
        """The prompt has been read (prefill's last forward is done): run the end pass, if any."""
        if self.end_pass is not None:
            self.end_pass(cache, self)


@COMPRESSORS.register("unified")
@dataclass
class Unified(Compressor):
    """``scorer``/``quantizer``/``propagator`` come from their config groups; ``precision`` is a dict here."""

    chunk_size: int = 512
    precision: dict[str, Any] = field(default_factory=dict)
    question: Literal["oracle", "end", "none"] = "oracle"
    quantizer: Any = None
    propagator: Any = None
    scorer: Any = None

    def __post_init__(self) -> None:
        if self.quantizer is None:
            from kvcomp.quantizer.none import NoQuantizer

            self.quantizer = NoQuantizer()
        self.policy = bind(Precision, self.precision, "compressor.precision")
        has_scorer = self.scorer is not None and getattr(self.scorer, "registry_name", "") != "none"
        if not has_scorer:
            self.scorer = None
        if self.policy.active and self.scorer is None:
            raise ConfigError(f"compressor.precision.mode={self.policy.mode} needs importance scores; "
                              "choose a scorer (scorer=prompt_guided, snapkv, h2o, ...) or mode=none")
        if self.policy.mode == "tiers" and getattr(self.quantizer, "registry_name", "") == "none":
            raise ConfigError("compressor.precision.mode=tiers stores tokens at 8/4/2 bits; quantizer=none "
                              "cannot; pick a packing quantizer (uniform, kvquant_stream, ...)")
        if self.propagator is not None and self.propagator.active(32) and self.scorer is None:
            raise ConfigError("propagation drops tokens by importance; choose a scorer (scorer=prompt_guided, ...)")

    def needs(self, n_layers: int) -> arch.Needs:
        drops = self.policy.may_drop or (self.propagator is not None and self.propagator.active(n_layers))
        what = [f"quantizer={getattr(self.quantizer, 'registry_name', '?')}"] if self.quantizer.pre_rope else []
        what += [f"scorer={getattr(self.scorer, 'registry_name', '?')}"] if self.scorer is not None else []
        return arch.Needs(pre_rope=self.quantizer.pre_rope, queries=self.scorer is not None,
                          masks=drops, slicing=self.propagator is not None and self.propagator.active(n_layers),
                          cache=True, method=" + ".join(what) or "this method")

    def new_cache(self, model: Any) -> CompressedCache:
        return CompressedCache(model, self.quantizer, policy=self.policy.for_prompt() if self.policy.active else None)

    def settings(self) -> dict[str, Any]:
        """Run settings reported in metrics.json (information the method was given)."""
        return {"question": self.question}

    @contextmanager
    def attach(self, model: Any, cache: Any, question_ids: Any = None) -> Iterator[None]:
        handles: list[Any] = []
        if self.question == "none":
            question_ids = None
        q_len = 0 if question_ids is None else int(question_ids.shape[-1])
        cache.question_len = q_len
        if self.scorer is not None:
            needs = self.scorer.needs_question
            if needs and question_ids is None:
                say_once(f"scorer={self.scorer.registry_name} needs a question and got none (compressor.question="
                         f"{self.question}): each chunk is scored by its own last 32 queries instead")
            window = self.scorer.query_window or (q_len if q_len else 32)
            cache.scoring = Scoring(self.scorer, model, window)
            if window != 0:
                for i, (module, _) in enumerate(cache.scoring.sources):
                    handles.append(module.register_forward_hook(cache.scoring.q_hook(i)))
            if needs and self.question == "oracle" and question_ids is not None:
                cache.guide_ids = question_ids
            if needs and self.question == "end" and question_ids is not None and self.policy.mode == "tiers":
                cache.policy.defer_drops = True
                cache.scoring.end_pass = lambda c, scoring: prompt_end(c, scoring, self.policy)
        if self.propagator is not None:
            handles += self.propagator.install(model, cache, fix_masks=self.policy.may_drop)
        try:
            yield
        finally:
            for h in handles:
                h.remove()

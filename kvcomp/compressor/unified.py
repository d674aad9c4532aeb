"""``compressor=unified``: compressed cache + chunked real-time prefill, composed from pluggable parts.

scorer (token importance, while prefill runs) + precision policy (scores -> bits or drop) + quantizer
(how tokens are stored) + propagator (which tokens reach later layers). Each is switched off with
``none`` (precision: ``mode: none``), so a component ablation is a pure config change. Parts talk
through small interfaces only: the scorer declares the queries it needs and whether the question guides
each chunk; the cache's layers ask the ``Session`` for scores (``Scoring.score``, from the attention pass) and
bits per token (``policy``); the propagator reads ``session.layer_scores``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcomp.cache import CompressedCache
from kvcomp.compressor.base import Compressor
from kvcomp.compressor.precision import Precision
from kvcomp.errors import ConfigError
from kvcomp.fields import bind
from kvcomp.kernels.interface import use_packed_attention
from kvcomp.registry import COMPRESSORS
from kvcomp.scorer.base import ScoreContext
from kvcomp.session import Session


class Scoring:
    """Per-sequence glue between the cache and a scorer: which trailing queries it reads (``window``)."""

    def __init__(self, scorer: Any, model: Any, window: int) -> None:
        cfg = model.config
        self.scorer = scorer
        self.window = window  # trailing queries to keep (-1 = all)
        self.n_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5

    def score(self, cache: CompressedCache, layer_idx: int, new_keys: torch.Tensor, positions: torch.Tensor,
              n_store: int, attn: tuple[torch.Tensor, torch.Tensor] | None, prompt_len: int) -> torch.Tensor:
        q = new_keys.shape[-2]
        pre = cache.rope.invert(new_keys, positions) if cache.rope is not None else new_keys
        queries = lse = None
        if attn is not None and self.window != 0:
            w = q if self.window < 0 else min(self.window, q)
            queries, lse = attn[0][:, :, -w:], attn[1][:, :, -w:]
        ctx = ScoreContext(layer_idx, self.n_layers, new_keys, pre, queries, lse, positions, n_store,
                           self.scaling, prompt_len)
        s = self.scorer.score(ctx).float()
        return torch.nan_to_num(s, nan=0.0)


@COMPRESSORS.register("unified")
@dataclass
class Unified(Compressor):
    """``scorer``/``quantizer``/``propagator`` come from their config groups; ``precision`` is a dict here."""

    chunk_size: int = 512
    precision: dict[str, Any] = field(default_factory=dict)
    guide_with_question: bool = True
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

    def new_cache(self, model: Any) -> CompressedCache:
        return CompressedCache(model, self.quantizer)

    def install(self, session: Session, stack: ExitStack) -> None:
        model = session.model
        session.policy = self.policy if self.policy.active else None
        if self.scorer is not None:
            window = self.scorer.query_window or (session.question_len or 32)
            session.scoring = Scoring(self.scorer, model, window)
            if self.scorer.needs_question and self.guide_with_question and session.question_ids is not None:
                session.guide_ids = session.question_ids
        if self.propagator is not None:
            handles = self.propagator.install(model, session, fix_masks=self.policy.may_drop)
            stack.callback(lambda: [h.remove() for h in handles])
        stack.enter_context(use_packed_attention(model, session))

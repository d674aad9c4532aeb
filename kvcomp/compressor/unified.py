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
from typing import Any, Literal

import torch

from kvcomp.cache import CompressedCache
from kvcomp.compressor.base import Compressor
from kvcomp.compressor.precision import Precision
from kvcomp.compressor.timing import budget_end, prompt_end, say_once
from kvcomp.errors import ConfigError
from kvcomp.fields import bind
from kvcomp.kernels.interface import use_packed_attention
from kvcomp.model import arch
from kvcomp.registry import COMPRESSORS
from kvcomp.scorer.base import ScoreContext
from kvcomp.session import Session


class Scoring:
    """Per-sequence glue between the cache and a scorer: which trailing queries it reads (``window``); the queries,
    their log-sum-exp and the softmax scale come from the attention pass itself (``kvcomp_packed``), so whatever
    the model does to its queries (q_norm, fused projections, Gemma's scale) is what the scorer sees."""

    def __init__(self, scorer: Any, model: Any, window: int) -> None:
        self.scorer = scorer
        self.window = window  # trailing queries to keep (-1 = all)
        self.n_layers = len(arch.decoder_layers(model))
        self.windows = arch.windows(model)  # per layer: its sliding window (None: full attention)
        #: question: end -- per layer, the last forward's trailing queries ``[B, Hq, W, D]``, their scaling and their
        #: absolute positions ``[W]`` (an appended question's queries are never stored, so the held tokens' last
        #: positions are not theirs)
        self.last_queries: dict[int, tuple[torch.Tensor, float, torch.Tensor]] = {}
        self.end_pass: Any = None  # question: end -- called once the prompt has been read
        #: False when nothing reads a chunk's scores (``PromptPolicy.scores_unused`` and no propagator): chunks are
        #: not scored (their trailing queries are still kept for the end pass, which scores the held history)
        self.streaming = True

    def score(self, cache: CompressedCache, layer_idx: int, new_keys: torch.Tensor, positions: torch.Tensor,
              n_store: int, attn: tuple[torch.Tensor, torch.Tensor, float] | None, prompt_len: int) -> torch.Tensor:
        q, d = new_keys.shape[-2], new_keys.shape[-1]
        if n_store == 0:  # only an appended question reached this layer (propagation stopped the chunk)
            return torch.zeros(0, device=new_keys.device)
        queries = lse = None
        scaling = d**-0.5
        if attn is not None:
            scaling = attn[2]
            if self.window != 0:
                w = q if self.window < 0 else min(self.window, q)
                queries, lse = attn[0][:, :, -w:], attn[1][:, :, -w:]
                self.last_queries[layer_idx] = (queries, scaling, positions[-w:])
        if not self.streaming:
            return torch.zeros(n_store, device=new_keys.device)
        rope = cache.ropes[layer_idx]
        pre = rope.invert(new_keys, positions) if rope is not None else new_keys
        ctx = ScoreContext(layer_idx, self.n_layers, new_keys, pre, queries, lse, positions, n_store,
                           scaling, prompt_len, self.windows[layer_idx])
        s = self.scorer.score(ctx).float()
        return torch.nan_to_num(s, nan=0.0)

    def prompt_end(self, run: Any) -> None:
        """The prompt has been read (the session's prefill is done): run the end pass, if any."""
        if self.end_pass is not None:
            self.end_pass(run, self)


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
        return CompressedCache(model, self.quantizer)

    def settings(self) -> dict[str, Any]:
        """Run settings reported in metrics.json (information the method was given)."""
        prop = self.propagator
        schedule = "none" if prop is None or not prop.active(32) else prop.schedule
        return {"question": self.question_read(), "propagation_schedule": schedule}

    def question_read(self) -> str:
        """What of the question the method reads: ``compressor.question`` (oracle / end / none) when the scorer
        reads the question; otherwise ``length`` when only a propagator's protected prompt end (``keep_last`` plus
        the question's token count) reads it, else ``unused`` (e.g. FastKV: its scorer and TSP read no question)."""
        if self.question == "none" or (self.scorer is not None and self.scorer.needs_question):
            return self.question
        prop = self.propagator
        return "length" if prop is not None and prop.reads_question(32) else "unused"

    def install(self, session: Session, stack: ExitStack) -> None:
        model = session.model
        session.policy = self.policy.for_prompt() if self.policy.active else None
        if self.question == "none":  # the method is given no question at all
            session.question_ids, session.question_len = None, 0
        if self.scorer is not None:
            needs = self.scorer.needs_question
            if needs and session.question_ids is None:
                say_once(f"scorer={self.scorer.registry_name} needs a question and got none (compressor.question="
                         f"{self.question}): each chunk is scored by its own last 32 queries instead")
            window = self.scorer.query_window or (session.question_len or 32)
            session.scoring = Scoring(self.scorer, model, window)
            if needs and self.question == "oracle" and session.question_ids is not None:
                session.guide_ids = session.question_ids
            if needs and self.question == "end" and session.question_ids is not None and self.policy.mode == "tiers":
                session.policy.defer_drops = True
                session.scoring.end_pass = lambda run, scoring: prompt_end(run, scoring, self.policy)
            if self.policy.mode == "budget" and self.policy.budget_at == "end":
                session.policy.defer_drops = True
                session.scoring.end_pass = lambda run, scoring: budget_end(run, scoring, self.policy)
        n_layers = len(arch.decoder_layers(model))
        propagates = self.propagator is not None and self.propagator.active(n_layers)
        if session.scoring is not None and session.policy is not None and not propagates:
            session.scoring.streaming = not session.policy.scores_unused()
        if self.propagator is not None:
            if self.propagator.staged(n_layers):
                from kvcomp.propagator.stage import StageSchedule

                session.schedule = StageSchedule(self.propagator, session)
            handles = self.propagator.install(model, session, fix_masks=self.policy.may_drop)
            stack.callback(lambda: [h.remove() for h in handles])
        stack.enter_context(use_packed_attention(model, session))

"""When a prompt-guided scorer learns the question: ``compressor.question`` (reported in metrics.json).

- ``oracle``: the question is known before the prompt is read (Finch-style): it is appended to every
  non-final prefill chunk, so every chunk is scored by the question's queries. Information a streaming
  prompt does not have; the upper bound.
- ``end``: the question is known only when the prompt ends. Chunks are scored without it (the trailing
  queries of each chunk, as many as the question has tokens, stand in for it); nothing is dropped and no
  token is stored below ``precision.hold_bits`` (4) yet. Where no streamed token's width can depend on its
  score (every tier at or below ``hold_bits``, or ``budget_at: end``) and no propagator reads the scores, chunks are
  not scored at all (``PromptPolicy.scores_unused``; the same cache as scoring them).
  When the prompt has been read, ``prompt_end`` re-scores
  every layer's held history with the question's queries of the last forward (the prompt ends with the
  question), maps those scores to tiers with fresh global quantiles per layer band, and demotes or drops
  tokens to them: a token ends at min(its streaming width, its question-aware width); none is promoted.
- ``none``: no question at all; a scorer that needs one scores each chunk by its own last 32 queries.

A scorer that needs a question and gets none (``none``, or no question for the sample) says so once in
the log. Only ``mode: tiers`` has an end pass; ``mode: budget`` under ``end`` keeps its streaming choice.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvcomp.cache.rewrite import demote, held_positions
from kvcomp.compressor.precision import Precision, RunningScores
from kvcomp.scorer.base import ScoreContext

log = logging.getLogger(__name__)
TIMINGS = ("oracle", "end", "none")
_said: set[str] = set()


def say_once(message: str) -> None:
    """Log ``message`` once per process (a per-sample warning would flood a 1000-sample run)."""
    if message not in _said:
        _said.add(message)
        log.warning(message)


def question_lse(queries: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 scaling: float, window: int | None) -> torch.Tensor:
    """Log-sum-exp ``[B, Hq, W]`` of the scaled logits of ``queries`` ``[B, Hq, W, D]`` over ``keys``
    ``[B, Hkv, N, D]`` at positions ``k_pos`` (causal, and within the sliding ``window`` when set)."""
    k = keys.float().repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    logits = torch.matmul(queries.float(), k.transpose(-1, -2)) * scaling
    hidden = k_pos[None, :] > q_pos[:, None]
    if window is not None:
        hidden |= q_pos[:, None] - k_pos[None, :] >= window
    return logits.masked_fill(hidden, float("-inf")).logsumexp(dim=-1)


def end_scores(run: Any, scoring: Any, bands: Any, history: int = 65536, layers: Any = None
               ) -> tuple[dict, dict, RunningScores]:
    """Per layer (of ``layers``, default all): the scorer's scores of its held tokens with the last forward's
    trailing queries (the prompt end, the question when it ends the prompt), their positions, and running
    statistics per ``bands(layer)``."""
    cache = run.cache
    stats, scores, positions = RunningScores(history), {}, {}
    n_layers = len(cache.layers)
    for i in range(n_layers) if layers is None else layers:
        layer = cache.layers[i]
        last = scoring.last_queries.get(i)
        if last is None or layer.held() == 0:
            continue
        queries, scaling, q_pos = last
        keys, _ = layer.materialize(with_values=False)
        pos = held_positions(layer).to(keys.device).long()
        rope = cache.ropes[i]
        pre = rope.invert(keys, pos) if rope is not None else keys
        lse = question_lse(queries, keys, q_pos.to(pos.device).long(), pos, scaling, scoring.windows[i])
        ctx = ScoreContext(i, n_layers, keys, pre, queries, lse, pos, int(pos.numel()), scaling,
                           int(run.prompt_len), scoring.windows[i])
        scores[i] = torch.nan_to_num(scoring.scorer.score(ctx).float(), nan=0.0)
        positions[i] = pos
        stats.add(bands(i), scores[i])
    return scores, positions, stats


def prompt_end(run: Any, scoring: Any, policy: Precision) -> dict[int, int]:
    """The question-aware pass of ``question: end`` over every layer of the run's cache; returns tokens dropped
    per layer. Scores come from the scorer itself, called with the held history as the stored tokens and the
    last forward's trailing queries (the question) as its queries."""
    n_layers = len(run.cache.layers)
    scores, positions, stats = end_scores(run, scoring, lambda i: policy.band(i, n_layers), policy.history)
    dropped = {}
    for i, s in scores.items():
        u = stats.rank(policy.band(i, n_layers), s)
        bits = policy.tier(u, positions[i])
        dropped[i] = demote(run.cache.layers[i], bits)
    return dropped


def budget_end(run: Any, scoring: Any, policy: Precision) -> dict[int, int]:
    """``precision.budget_at: end``: each layer keeps its top ``policy.end_keep`` held tokens (``keep_ratio`` /
    ``keep_tokens`` of what it holds, or of the prompt with ``keep_of: prompt``) by the scorer's score with the
    prompt end's queries, those queries' own tokens (the held tokens at the queries' positions, whatever the
    storage order; an appended question's queries have none) and the sinks included; the rest are dropped.
    Returns tokens dropped per layer."""
    scores, positions, _ = end_scores(run, scoring, lambda i: i)
    dropped = {}
    for i, s in scores.items():
        n = s.numel()
        held = positions[i].to(s.device).long()
        q_pos = scoring.last_queries[i][2].to(s.device).long()
        s = s.clone()
        s[torch.isin(held, q_pos)] = float("inf")  # the observation window stays (SnapKV, FastKV), and the sinks
        s[held < policy.protect_sinks] = float("inf")
        bits = torch.zeros(n, dtype=torch.int64, device=s.device)
        bits[torch.topk(s, policy.end_keep(n, run.prompt_len)).indices] = -1
        dropped[i] = demote(run.cache.layers[i], bits)
    return dropped

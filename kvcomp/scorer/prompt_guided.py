"""``scorer=prompt_guided``: s_i = α·Â_P,i·w_l + β·b_pos(i) + γ·r(i) for every stored context token i.

With the question's tokens P appended to each prefill chunk (Finch-style; their K/V are never stored),
chunk tokens i at absolute positions p_i, and a prompt of T tokens:

- Â_P,i: attention the question pays to token i, softmax over history + chunk, averaged over the
  question's queries and all query heads, min-max normalised over the chunk to [0, 1];
- w_l = 1 - layer_decay · l / (L - 1): layer weight schedule (deep layers' attention is more diffuse,
  so it counts less; layer_decay 0 = uniform);
- b_pos(i) = max(0, 1 - p_i / W, 1 - (T - 1 - p_i) / W), W = ``pos_window``: position-bias
  compensation. A question's attention under-weights the prompt's frame (instructions at its start,
  the end of the context just before the question) relative to the middle content it searches; b_pos
  gives those positions a prior, so the instructions survive compression;
- r(i) = max_j cos(k̃_i, k̃_P,j), min-max normalised: context relevance, the best cosine between token
  i's pre-RoPE key (content without position, averaged over KV heads) and any question token's.

Â and r are max-pooled over ``pool_kernel`` (21) neighbouring tokens (as SnapKV does), so the tokens around
a match (the value next to its key) share its score; 21 rather than SnapKV's 7 because with propagation a
7-digit value must reach the deep layers whole (measured: docs/results.md, "Why scorer.pool_kernel: 21").
``attention_from`` (0 = every layer) leaves α·Â out in the layers shallower than that fraction of the depth
(l / (L - 1) < attention_from): at layer 0 the question's attention ranked tokens by position, not content, on
SmolLM2-135M (docs/propagation_quality.md, "Why prompt_guided with `question: end` loses with propagation"), so those
layers' scores, and the early propagation selections made from them, rest on b_pos and r.
``term_scale`` sets how Â and r are made comparable:
``chunk`` min-max normalises each over the chunk (every chunk then has a token at 1, whatever it holds);
``absolute`` keeps them on one scale across chunks, so a downstream global policy can tell a filler chunk
from a needle chunk: Â = x / (1 + x) with x = attention x number of keys (1 = uniform attention -> 0.5),
r = the cosine clamped to [0, 1]. Each term is switched off by a weight of 0. The
weights need not sum to 1; scores are only ranked and normalised downstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvcomp.errors import ConfigError
from kvcomp.fields import param
from kvcomp.registry import SCORERS
from kvcomp.scorer.base import ScoreContext, Scorer, minmax, pool1d, stored_attention


@SCORERS.register("prompt_guided")
@dataclass
class PromptGuided(Scorer):
    """Defaults α 0.4, β 0.3, γ 0.3; the question guides every chunk."""

    alpha: float = param(0.4, ge=0)
    beta: float = param(0.3, ge=0)
    gamma: float = param(0.3, ge=0)
    layer_decay: float = param(0.5, ge=0, le=1)
    pos_window: int = param(64, gt=0)
    pool_kernel: int = param(21, ge=1, where=lambda k: k % 2 == 1, what="odd")
    term_scale: Literal["chunk", "absolute"] = "absolute"
    attention_from: float = param(0.0, ge=0, le=1)
    query_window: int = 0  # set from the question length at run time
    needs_question: bool = True

    def __post_init__(self) -> None:
        if self.alpha + self.beta + self.gamma <= 0:
            raise ConfigError("scorer.alpha + scorer.beta + scorer.gamma must be > 0")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        n = ctx.n_store
        s = torch.zeros(n, device=ctx.positions.device)
        w = ctx.queries.shape[2] if ctx.queries is not None else 0
        depth = ctx.layer_idx / max(1, ctx.n_layers - 1)
        if self.alpha and w and depth >= self.attention_from:
            w_l = 1.0 - self.layer_decay * depth
            a = stored_attention(ctx)
            if self.term_scale == "absolute":
                x = a * (int(ctx.positions[-1]) + 1)  # keys the last query sees (dropped ones included)
                a = x / (1 + x)
            s += self.alpha * w_l * self._scale(pool1d(a, self.pool_kernel))
        if self.beta:
            p = ctx.positions[:n].float()
            last = float(max(ctx.prompt_len, int(ctx.positions[-1]) + 1) - 1)
            b_pos = torch.maximum(1 - p / self.pos_window, 1 - (last - p) / self.pos_window)
            s += self.beta * b_pos.clamp(0, 1)
        if self.gamma:
            k = torch.nn.functional.normalize(ctx.new_keys_pre.float().mean(dim=(0, 1)), dim=-1)  # [q, D]
            guide = k[n:] if k.shape[0] > n else k[-max(1, w):]
            s += self.gamma * self._scale(pool1d((k[:n] @ guide.T).amax(dim=-1), self.pool_kernel))
        return s

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return minmax(x) if self.term_scale == "chunk" else x.clamp(0, 1)

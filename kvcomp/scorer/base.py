"""Scorer interface: the importance of every token a layer stores, computed while prefill runs.

The compressed cache calls ``scorer.score(ctx)`` in each layer's attention during prefill, for the new
tokens it is about to store; attention weights come from that same pass (``ScoreContext.lse``), never
from a second copy of the history keys. A scorer declares what it needs: ``query_window`` trailing
queries of the forward (-1 = all of them) and ``needs_question`` (the question is appended to every
non-final prefill chunk, Finch-style, then its K/V are discarded).
Scores are per token, higher = more important; NaN is never returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomp.fields import param


@dataclass
class ScoreContext:
    """What one layer knows when it stores ``n_store`` new tokens (read from the attention pass itself).

    ``new_keys``: ``[B, H_kv, q, D]`` post-RoPE keys of this forward's tokens; ``new_keys_pre``: the same
    pre-RoPE (content without position); ``queries``: ``[B, H_q, W, D]`` post-RoPE trailing queries of the
    forward (None if the scorer asked for none) and ``lse``: ``[B, H_q, W]`` the log-sum-exp of their scaled
    logits over everything they attended to (history + the forward's tokens, causal), so attention weights
    to the new tokens need no second pass over the history. ``positions``: ``[q]`` absolute positions of the
    new tokens; the first ``n_store`` are stored, the rest (``q - n_store``) are an appended question.
    ``scaling``: the attention's softmax scale; ``prompt_len``: tokens in the whole prompt (0 if unknown);
    ``window``: the layer's sliding window (keys this far back or more are invisible, as in the model).
    """

    layer_idx: int
    n_layers: int
    new_keys: torch.Tensor
    new_keys_pre: torch.Tensor
    queries: torch.Tensor | None
    lse: torch.Tensor | None
    positions: torch.Tensor
    n_store: int
    scaling: float
    prompt_len: int = 0
    window: int | None = None  # the layer's sliding window: queries see keys less than this far back

    def attention(self, chunk: int = 256) -> torch.Tensor:
        """Softmax attention of ``queries`` to the forward's new tokens, ``[B, H_q, W, q]`` (fp32; rows are
        normalised over history + new tokens, so they sum to <= 1), causal for queries that are new tokens
        themselves. GQA: each KV head serves ``H_q / H_kv`` query heads, keys are not repeated."""
        assert self.queries is not None and self.lse is not None, "this scorer set query_window=0"
        b, hq, w, d = self.queries.shape
        hkv, q = self.new_keys.shape[1], self.new_keys.shape[2]
        k = self.new_keys.float().unsqueeze(2)  # [B, Hkv, 1, q, D]
        future = torch.ones(w, q, dtype=torch.bool, device=k.device).triu_(q - w + 1)  # query i is token q-w+i
        if self.window:  # the same keys the model's sliding-window layer sees
            pos = self.positions.long()
            future |= pos[None, :] <= pos[-w:, None] - self.window
        out = []
        for s in range(0, w, chunk):  # query blocks bound the transient [B, H, chunk, q] buffer
            qb = self.queries[:, :, s : s + chunk].float().reshape(b, hkv, hq // hkv, -1, d)
            logits = torch.matmul(qb, k.transpose(-1, -2)).reshape(b, hq, -1, q) * self.scaling
            logits.masked_fill_(future[s : s + chunk], float("-inf"))
            out.append(torch.exp(logits - self.lse[:, :, s : s + chunk, None]))
        return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Rescale ``x`` [T] to [0, 1] (all zeros if constant)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def pool1d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool ``x`` [T] with an odd ``kernel`` (same length), SnapKV's clustering of neighbours."""
    if kernel <= 1:
        return x
    return torch.nn.functional.max_pool1d(x[None, None], kernel, stride=1, padding=kernel // 2)[0, 0, : x.numel()]


@dataclass
class Scorer:
    """Base scorer. ``query_window``: trailing queries needed (0 none, -1 all); ``needs_question``."""

    query_window: int = param(0, ge=-1)
    needs_question: bool = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """Importance ``[n_store]`` of the stored new tokens (float32, higher = keep/more bits)."""
        raise NotImplementedError


def stored_attention(ctx: ScoreContext) -> torch.Tensor:
    """Mean attention (over batch, query heads and queries) that the window pays to each stored token, [n_store]."""
    return ctx.attention()[..., : ctx.n_store].mean(dim=(0, 1, 2))

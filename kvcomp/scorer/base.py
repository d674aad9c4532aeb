"""Scorer interface: the importance of every token a layer stores, computed while prefill runs.

The compressed cache calls ``scorer.score(ctx)`` in each layer's ``update`` during prefill, for the new
tokens it is about to store. A scorer declares what it needs: ``query_window`` trailing queries of the
forward (captured from ``q_proj`` by the unified compressor; -1 = all of them) and ``needs_question``
(the question is appended to every non-final prefill chunk, Finch-style, then its K/V are discarded).
Scores are per token, higher = more important; NaN is never returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomp.fields import param


@dataclass
class ScoreContext:
    """What one layer knows when it stores ``n_store`` new tokens.

    ``keys``: ``[B, H_kv, held + q, D]`` post-RoPE keys attention uses (history, then the new tokens);
    ``new_keys_pre``: ``[B, H_kv, q, D]`` pre-RoPE keys of the new tokens (content without position);
    ``queries``: ``[B, H_q, W, D]`` post-RoPE trailing queries (None if the scorer asked for none);
    ``positions``: ``[q]`` absolute positions of the new tokens; the first ``n_store`` are stored, the rest
    (``q - n_store``) are an appended question. ``held``: history tokens before them in ``keys``;
    ``scaling``: attention's 1/sqrt(D); ``prompt_len``: tokens in the whole prompt (0 if unknown);
    ``key_positions``/``window``: the history's positions and the layer's sliding window, so ``attention``
    masks exactly what the model's layer masks.
    """

    layer_idx: int
    n_layers: int
    keys: torch.Tensor
    new_keys_pre: torch.Tensor
    queries: torch.Tensor | None
    positions: torch.Tensor
    n_store: int
    held: int
    scaling: float
    prompt_len: int = 0
    key_positions: torch.Tensor | None = None  # [held] absolute positions of the history keys (None: all earlier)
    window: int | None = None  # the layer's sliding window: queries see keys less than this far back

    def attention(self, chunk: int = 256) -> torch.Tensor:
        """Softmax attention of ``queries`` over all keys, ``[B, H_q, W, held + q]`` (fp32), causal for the
        queries that are themselves new tokens. GQA: each KV head serves ``H_q / H_kv`` query heads."""
        assert self.queries is not None, "this scorer set query_window=0"
        b, hq, w, d = self.queries.shape
        hkv = self.keys.shape[1]
        k = self.keys.float().repeat_interleave(hq // hkv, dim=1)
        q_pos = self.positions[-w:] if w <= self.positions.numel() else self.positions
        hist = self.key_positions
        if hist is None:
            hist = torch.full((self.held,), -1, device=k.device, dtype=torch.long)
        k_pos = torch.cat([hist.to(device=k.device, dtype=torch.long), self.positions.long()])
        window = self.window if self.key_positions is not None else None
        out = []
        for s in range(0, w, chunk):  # query blocks bound the transient [B, H, chunk, n] buffer
            qb = self.queries[:, :, s : s + chunk].float()
            logits = torch.matmul(qb, k.transpose(-1, -2)) * self.scaling
            future = k_pos[None, :] > q_pos[s : s + chunk, None].long()
            if window is not None:  # the same keys the model's sliding-window layer sees
                future |= k_pos[None, :] <= q_pos[s : s + chunk, None].long() - window
            logits.masked_fill_(future.view(1, 1, *future.shape), float("-inf"))
            out.append(torch.softmax(logits, dim=-1))
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
    a = ctx.attention()
    return a[..., ctx.held : ctx.held + ctx.n_store].mean(dim=(0, 1, 2))

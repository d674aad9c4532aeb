"""``propagation=fastkv_tsp``: FastKV's token-selective propagation (Jo et al., 2025).

Layers up to ``tsp_layer`` process every token; the hidden states leaving ``tsp_layer`` keep only
``tsp_rate`` of the prompt (or ``tsp_len`` tokens), and every later layer computes and caches only those.
``tsp_layer: null`` = the last layer of the first half (``L // 2 - 1``: FastKV's ``tsp_idx`` 15 of 32 layers).

With ``schedule: stage`` (default) the selection is the official code's, made once the whole prompt has passed
``tsp_layer``: the last ``window`` (8) queries of the prompt at that layer attend (softmax, causal in the
window) over every token's keys; each token's score is that attention summed over the window's queries,
pooled (``pool``: max, the official scripts' default, or avg) over ``kernel`` (7) neighbours, summed over all
query heads (GQA groups and KV heads; ``heads: max``, not the official code, takes the largest KV head's group
sum instead, so a token one KV head needs is carried even when the others ignore it); the top
``int(tsp_rate * T) - window`` tokens (``tsp_len - window`` with ``tsp_len``, FastKV's constant mode; a prompt of
at most ``tsp_len`` tokens carries every token) before
the window go on with the window itself (FastKV's ``update_kv`` at its TSP layer). The per-layer KV budget is
the precision policy's, as for any method. ``schedule: chunk`` (ablation): the base class's per-forward
selection by the scorer's scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from kvcomp.errors import ConfigError
from kvcomp.fields import param
from kvcomp.propagator.base import Propagator
from kvcomp.registry import PROPAGATORS


def tsp_scores(keys: torch.Tensor, queries: torch.Tensor, scaling: float, kernel: int, pool: str = "avg",
               heads: str = "sum") -> torch.Tensor:
    """FastKV's TSP score ``[N - W]`` of the tokens before the window: ``queries`` ``[1, H_q, W, D]`` are the
    last W of the N tokens whose keys are ``keys`` ``[1, H_kv, N, D]`` (post-RoPE). ``heads``: ``sum`` over every
    query head (FastKV's) or ``max`` over the KV heads of each one's query-group sum."""
    hq, hkv, w, n = queries.shape[1], keys.shape[1], queries.shape[2], keys.shape[2]
    k = keys.float().repeat_interleave(hq // hkv, dim=1)
    logits = torch.matmul(queries.float(), k.transpose(-1, -2)) * scaling  # [1, Hq, W, N]
    future = torch.ones(w, w, dtype=torch.bool, device=k.device).triu_(1)
    logits[..., n - w :].masked_fill_(future, float("-inf"))
    attn = torch.softmax(logits, dim=-1)[..., : n - w].sum(dim=2)  # [1, Hq, N - W]
    pool1d = torch.nn.functional.max_pool1d if pool == "max" else torch.nn.functional.avg_pool1d
    pooled = pool1d(attn, kernel, stride=1, padding=kernel // 2)
    if heads == "max":
        return pooled[0].reshape(hkv, hq // hkv, n - w).sum(dim=1).max(dim=0).values
    return pooled.sum(dim=1)[0]


@PROPAGATORS.register("fastkv_tsp")
@dataclass
class FastKVTSP(Propagator):
    """One selection layer ``tsp_layer`` keeping ``tsp_rate`` of the tokens (or ``tsp_len`` of them);
    ``window``/``kernel``/``pool``: the official code's."""

    tsp_layer: int | None = param(None, ge=0)
    tsp_rate: float = param(0.2, gt=0, le=1)
    tsp_len: int | None = param(None, gt=0)
    window: int = param(8, gt=0)
    kernel: int = param(7, ge=1, where=lambda k: k % 2 == 1, what="odd")
    pool: Literal["max", "avg"] = "max"
    heads: Literal["sum", "max"] = "sum"

    def __post_init__(self) -> None:
        if self.tsp_len is not None and self.schedule != "stage":
            raise ConfigError(f"propagation.tsp_len={self.tsp_len} needs propagation.schedule=stage (got "
                              f"schedule={self.schedule}); with schedule=chunk use tsp_rate")

    def ratio(self, layer_idx: int, n_layers: int) -> float:
        tsp = max(0, n_layers // 2 - 1) if self.tsp_layer is None else self.tsp_layer
        if tsp >= n_layers - 1 and self.tsp_layer is not None:
            raise ConfigError(f"propagation.tsp_layer={self.tsp_layer} must be < {n_layers - 1} for this model")
        return float(self.tsp_rate) if layer_idx >= tsp else 1.0

    def reads_question(self, n_layers: int) -> bool:
        """The stage schedule's selection reads no question (its window is the prompt's last queries); the chunk
        ablation protects the question's length like the base class."""
        return self.active(n_layers) and self.schedule == "chunk"

    def query_window(self, run: Any, step: int) -> int:
        return self.window

    def select(self, run: Any, layer: int, n_layers: int, keys: torch.Tensor, queries: torch.Tensor,
               scaling: float, pos: torch.Tensor, prompt_len: int, share: float, acc: torch.Tensor | None,
               window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = pos.numel()
        w = min(self.window, n, queries.shape[2])
        target = self.tsp_len if self.tsp_len is not None else int(prompt_len * self.tsp_rate)
        if n <= target or n <= w:
            keep = torch.arange(n, device=pos.device)
            return keep, torch.zeros(n, device=pos.device)
        s = tsp_scores(keys, queries[:, :, -w:], scaling, self.kernel, self.pool, self.heads)
        top = s.topk(max(0, target - w)).indices
        keep = torch.cat([top, torch.arange(n - w, n, device=top.device)]).sort().values
        return keep, torch.zeros(keep.numel(), device=keep.device)

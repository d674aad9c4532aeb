"""``propagation=fastkv_tsp``: FastKV's token-selective propagation (Jo et al., 2025).

Layers up to ``tsp_layer`` process every token; the hidden states leaving ``tsp_layer`` keep only
``tsp_rate`` of the prompt, and every later layer computes and caches only those. ``tsp_layer: null`` = the
middle layer.

With ``schedule: stage`` (default) the selection is the paper's, made once the whole prompt has passed
``tsp_layer``: the last ``window`` (8) queries of the prompt at that layer attend (softmax, causal in the
window) over every token's keys; each token's score is that attention summed over the window's queries,
average-pooled over ``kernel`` (7) neighbours, summed over all query heads (GQA groups and KV heads); the top
``int(tsp_rate * T) - window`` tokens before the window go on with the window itself (FastKV's
``update_kv`` at its TSP layer). The per-layer KV budget is the precision policy's, as for any method.
``schedule: chunk`` (ablation): the base class's per-forward selection by the scorer's scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.errors import ConfigError
from kvcomp.fields import param
from kvcomp.propagator.base import Propagator
from kvcomp.registry import PROPAGATORS


def tsp_scores(keys: torch.Tensor, queries: torch.Tensor, scaling: float, kernel: int) -> torch.Tensor:
    """FastKV's TSP score ``[N - W]`` of the tokens before the window: ``queries`` ``[1, H_q, W, D]`` are the
    last W of the N tokens whose keys are ``keys`` ``[1, H_kv, N, D]`` (post-RoPE)."""
    hq, hkv, w, n = queries.shape[1], keys.shape[1], queries.shape[2], keys.shape[2]
    k = keys.float().repeat_interleave(hq // hkv, dim=1)
    logits = torch.matmul(queries.float(), k.transpose(-1, -2)) * scaling  # [1, Hq, W, N]
    future = torch.ones(w, w, dtype=torch.bool, device=k.device).triu_(1)
    logits[..., n - w :].masked_fill_(future, float("-inf"))
    attn = torch.softmax(logits, dim=-1)[..., : n - w].sum(dim=2)  # [1, Hq, N - W]
    pooled = torch.nn.functional.avg_pool1d(attn, kernel, stride=1, padding=kernel // 2)
    return pooled.sum(dim=1)[0]


@PROPAGATORS.register("fastkv_tsp")
@dataclass
class FastKVTSP(Propagator):
    """One selection layer ``tsp_layer`` keeping ``tsp_rate`` of the tokens; ``window``/``kernel``: the paper's."""

    tsp_layer: int | None = param(None, ge=0)
    tsp_rate: float = param(0.2, gt=0, le=1)
    window: int = param(8, gt=0)
    kernel: int = param(7, ge=1, where=lambda k: k % 2 == 1, what="odd")

    def ratio(self, layer_idx: int, n_layers: int) -> float:
        tsp = n_layers // 2 if self.tsp_layer is None else self.tsp_layer
        if tsp >= n_layers - 1 and self.tsp_layer is not None:
            raise ConfigError(f"propagation.tsp_layer={self.tsp_layer} must be < {n_layers - 1} for this model")
        return float(self.tsp_rate) if layer_idx >= tsp else 1.0

    def query_window(self, run: Any, step: int) -> int:
        return self.window

    def select(self, run: Any, layer: int, n_layers: int, keys: torch.Tensor, queries: torch.Tensor,
               scaling: float, pos: torch.Tensor, prompt_len: int, share: float, acc: torch.Tensor | None,
               window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = pos.numel()
        w = min(self.window, n, queries.shape[2])
        target = int(prompt_len * self.tsp_rate)
        if n <= target or n <= w:
            keep = torch.arange(n, device=pos.device)
            return keep, torch.zeros(n, device=pos.device)
        s = tsp_scores(keys, queries[:, :, -w:], scaling, self.kernel)
        top = s.topk(max(0, target - w)).indices
        keep = torch.cat([top, torch.arange(n - w, n, device=top.device)]).sort().values
        return keep, torch.zeros(keep.numel(), device=keep.device)

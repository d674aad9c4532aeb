"""Attention masks from absolute positions, for layers whose cache holds a sparse set of past tokens.

When kvcomp drops tokens (precision budget, propagation), a layer's keys are its held history (sparse
positions) followed by the forward's new tokens, and its queries may be a subset of the forward's tokens.
The model's own masks assume contiguous positions, so each layer gets one built here, with the same rule as
transformers' ``causal_mask_function`` / ``sliding_window_overlay``: query at position ``p`` sees a key at
``k`` iff ``k <= p`` and, on a sliding-window layer, ``k > p - window``.

The mask is in the form the attention implementation expects: boolean (True = attend) for ``sdpa``,
additive float (0 / dtype min) for ``eager``, which *adds* the mask to the scores.
"""

from __future__ import annotations

import torch

from kvcomp.errors import ConfigError


def visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool ``[q, k]``: which keys (positions ``key_pos`` [k]) each query (``query_pos`` [q]) attends to."""
    kp = key_pos.to(device=query_pos.device, dtype=torch.long)[None, :]
    qp = query_pos.long()[:, None]
    ok = kp <= qp
    if window is not None:
        ok &= kp > qp - window
    return ok


def layer_mask(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None, impl: str,
               dtype: torch.dtype) -> torch.Tensor | None:
    """Mask ``[1, 1, q, k]`` for attention implementation ``impl``; None when a single query sees every key
    (sdpa with q > 1 and no mask would assume top-left causal alignment, so a mask is always given then)."""
    ok = visible(key_pos, query_pos, window)
    if ok.shape[0] == 1 and bool(ok.all()):
        return None
    if impl == "sdpa":
        return ok[None, None]
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=ok.device)
        return torch.where(ok, zero, torch.finfo(dtype).min)[None, None]
    raise ConfigError(f"model.attn_implementation={impl} takes no per-layer masks; kvcomp drops tokens only with "
                      "sdpa or eager (model.attn_implementation=sdpa)")

"""The oracle of every attention path: a layer's whole history dequantized (``materialize``), one float32 softmax
(``materialized_attention``). Tests hold the tiled, compiled and Triton paths to it."""

from __future__ import annotations

from typing import Any

import torch

from kvcomp.cache.storage import Dense


def materialize(layer: Any, new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
                with_values: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Dequantized history of ``layer`` (post-RoPE keys) followed by ``new_k``/``new_v`` as given:
    ``[B, H, held + q, D]`` in the model dtype, written block by block into one buffer (transients stay
    block-sized). ``with_values=False``: the keys only (values None), as a scorer over the held history needs."""
    kb, vb, pb = list(layer.k_blocks), list(layer.v_blocks), list(layer.pos_blocks)
    if layer.res_k is not None:
        kb.append(Dense(layer.res_k))
        vb.append(Dense(layer.res_v))
        pb.append(layer.res_pos)
    if not kb:
        return new_k, new_v
    held = sum(int(p.numel()) for p in pb)
    q = 0 if new_k is None else new_k.shape[-2]
    b, h, _, d = kb[0].shape
    keys = torch.empty(b, h, held + q, d, dtype=layer.dtype, device=layer.device)
    values = torch.empty(b, h, held + q, d, dtype=layer.dtype, device=layer.device) if with_values else None
    cos = sin = None
    if layer.rope is not None:
        cos, sin = layer.rope.cos_sin(torch.cat(pb))
    o = 0
    for kblk, vblk, p in zip(kb, vb, pb, strict=True):
        n = int(p.numel())
        k = kblk.dequantize(layer.dtype)
        if cos is not None:
            k = layer.rope.rotate(k, cos[o : o + n], sin[o : o + n])
        keys[..., o : o + n, :] = k
        if values is not None:
            values[..., o : o + n, :] = vblk.dequantize(layer.dtype)
        o += n
    if q:
        keys[..., held:, :] = new_k
        if values is not None:
            values[..., held:, :] = new_v
    return keys, values


def materialized_attention(layer: Any, query: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
                           positions: torch.Tensor, scale: float, window: int | None = None,
                           softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: whole history dequantized (``materialize``), one float32 softmax with history visible and the
    new tokens causal (and keys older than ``window`` positions hidden). Returns (out, lse ``[B, Hq, q]``)."""
    keys, values = layer.materialize(new_k, new_v)
    b, hq, q, d = query.shape
    g = hq // keys.shape[1]
    k = keys.float().repeat_interleave(g, dim=1)
    v = values.float().repeat_interleave(g, dim=1)
    held = keys.shape[-2] - q
    hist_pos = [*layer.pos_blocks, *([layer.res_pos] if layer.res_pos is not None else [])]
    k_pos = torch.cat([*(p.long() for p in hist_pos), positions.long()]) if held else positions.long()
    q_pos = positions.long()
    visible = torch.ones(q, held + q, dtype=torch.bool, device=query.device)
    visible[:, held:] = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
    if window:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    s = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    if softcap:  # Gemma 2: logits soft-capped before the mask, as its eager attention does
        s = torch.tanh(s / softcap) * softcap
    s.masked_fill_(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), v)
    return out.to(query.dtype), lse

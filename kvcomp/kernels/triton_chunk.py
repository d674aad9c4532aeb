"""Triton path for a prefill chunk: ``n`` queries attend to a layer's whole packed history, then to themselves.

For post-RoPE queries ``q`` ``[B, Hq, n, D]`` over a ``CompressedLayer`` as it is before this forward stores its
tokens, and the forward's own post-RoPE K/V ``[B, Hkv, n, D]``, the same (out, lse) pair as
``chunk.chunk_attention`` (the tiled CPU path)::

    out = softmax([q·K_hist^T | q·K_new^T + causal] * scale) @ [V_hist | V_new]

- The packed 2/4/8-bit history blocks (sparse outliers, pre-RoPE keys rotated in registers at their stored
  positions) go through the decode kernel (``triton_decode._decode_kernel``): history precedes the chunk, so
  every history token is visible to every query and no mask is needed. The G query heads of a KV head times the
  ``n`` queries are the ``R = G * n`` rows of that KV head (a reshape of ``q``, no copy of K/V); a program runs
  ``block_r`` rows over a run of consecutive ``split``-token pieces of the history (about ``programs`` programs
  in all, so the partials stay bounded), reading K/V codes once per row tile, and writes a partial
  (max, sum, acc) merged in torch.
- The rest (blocks the kernel does not read: 3-bit, ``ChannelSplit``, fp16 warm-up/sink blocks, mixed pairs;
  the full-precision residual; the chunk's own K/V, causal) goes through ``chunk.chunk_attention`` on a
  ``History`` of just those, and the two (out, lse) pairs are merged by log-sum-exp.
- Head dims that are not a power of two >= 32, non-rotate-half or ``dynamic`` RoPE: ``chunk.chunk_attention``
  entirely. Sliding windows and soft-capping never reach here (``interface.py`` sends them to the oracle).
"""

from __future__ import annotations

from typing import Any

import torch

from kvcomp.kernels.chunk import History, Merge, chunk_attention
from kvcomp.kernels.reference import Softmax
from kvcomp.kernels.triton_decode import check_args, dot_dtype, fused_partials


def _same_blocks(history: History, layer: Any) -> bool:
    return len(history.k_blocks) == len(layer.k_blocks) and all(
        a is b for a, b in zip([*history.k_blocks, *history.v_blocks], [*layer.k_blocks, *layer.v_blocks]))


@torch.no_grad()
def chunk_attention_triton(query: torch.Tensor, layer: Any, new_k: torch.Tensor, new_v: torch.Tensor, scale: float,
                           history: History | None = None, block_t: int = 32, split: int = 256, block_o: int = 32,
                           block_r: int = 64, programs: int = 1024, num_warps: int | None = None,
                           exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[B, Hq, n, D]`` over ``layer``'s history, then ``new_k``/``new_v`` ``[B, Hkv, n, D]``
    (causal); ``Hq`` a multiple of ``Hkv``. ``history``: the layer's ``History`` this forward found (default:
    ``layer.history()``); if its blocks are no longer the layer's, everything goes through the tiled path.
    ``block_t``/``split``/``block_o``: as in ``decode_attention_triton``; ``block_r``: query rows per program
    (>= 16); ``programs``: about how many programs run in all (each over consecutive splits), so the float32
    partials (``[B * Hkv, s, G * n, D]``, ``s`` ~ ``programs`` / (``B * Hkv`` x row tiles), at least 1) stay
    bounded whatever the history length. Dots are exact float32 for a float32 query (or ``exact``), tensor
    cores in a 16-bit query's dtype.
    Returns (out ``[B, Hq, n, D]`` in ``query.dtype``, lse ``[B, Hq, n]`` float32), as ``chunk_attention``."""
    check_args(block_t, split, block_o)
    b, hq, n, d = query.shape
    hkv = new_k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    hist = layer.history() if history is None else history
    state, other = None, list(range(len(hist.k_blocks)))
    if _same_blocks(hist, layer):
        q = (query.float() * scale).reshape(b, hkv, hq // hkv * n, d).contiguous()  # row g * n + i
        state = Softmax.empty(b, hkv, q.shape[2], d, query.device)
        other = fused_partials(q, layer, state, dot_dtype(query, exact), block_t, split, block_o, block_r, num_warps,
                               programs)
    rest = History([hist.k_blocks[i] for i in other], [hist.v_blocks[i] for i in other],
                   [hist.pos_blocks[i] for i in other], hist.res_k, hist.res_v, hist.res_pos)
    out, lse = chunk_attention(query.float(), rest, new_k, new_v, scale, layer.rope)
    if state is not None and len(other) < len(hist.k_blocks):
        merged = Merge()
        merged.add(out.float(), lse)
        merged.add((state.acc / state.l[..., None]).reshape(b, hq, n, d),
                   (state.m + torch.log(state.l)).reshape(b, hq, n))
        out, lse = merged.out, merged.lse
    return out.to(query.dtype), lse

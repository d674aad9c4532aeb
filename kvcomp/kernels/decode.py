"""One decode step's attention on the CPU straight from the packed codes (``cpu_src.py`` ``decode_partial``).

For one query step ``q`` ``[B, Hq, 1, D]`` over a layer's history (``chunk.History``) and this step's own
post-RoPE ``new_k``/``new_v`` ``[B, Hkv, 1, D]``::

    out = softmax([q·K_hist^T | q·k_new] * scale) @ [V_hist | v_new]

Each stored block pair describes itself to the kernel (``decode_meta``: dense, packed, or channel-split
rows); the kernel decodes K rows in registers, re-applies RoPE at the stored positions (cos/sin rows of the
rope's table), scores the ``G`` query heads of each KV head, and folds V rows into an online softmax, the
block's tokens split over the threads (flash-decoding), the partial states merged in place. A block the kernel
cannot read (sparse outliers, shared beam rows, another storage type) is first written as a float32 tile by
its own ``tile_into`` and read as a dense source. Returns (out ``[B, Hq, 1, D]``, lse ``[B, Hq, 1]``), or None
where the kernels are off or the model's RoPE is not the split-half rotation (the tiled path runs instead).
"""

from __future__ import annotations

from typing import Any

import torch

from kvcomp.kernels import cpu
from kvcomp.kernels.cpu import NO_ROT


def _meta(block: Any, keep: list[torch.Tensor]) -> list[int] | None:
    fn = getattr(block, "decode_meta", None)
    return None if fn is None else fn(keep)


@torch.no_grad()
def decode_attention_cpu(query: torch.Tensor, history: Any, new_k: torch.Tensor, new_v: torch.Tensor, scale: float,
                         rope: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    ops = cpu.on(query)
    b, hq, q_len, d = query.shape
    hkv = new_k.shape[1]
    if ops is None or q_len != 1 or (rope is not None and not rope.split_half(d)):
        return None
    g = hq // hkv
    q = (query.float().reshape(b, hkv, g, d) * scale).contiguous()
    m = torch.full((b, hkv, g), float("-inf"))
    l, acc = torch.zeros(b, hkv, g), torch.zeros(b, hkv, g, d)
    segs = [*history.segments(), (new_k, new_v, None)]
    for kb, vb, pos in segs:
        keep: list[torch.Tensor] = []
        n = int(kb.shape[2])
        if pos is None:  # this step's own post-RoPE K/V
            km, vm, rot = cpu.dense_meta(kb, keep), cpu.dense_meta(vb, keep), None
        else:
            rot = rope.lookup(pos) if rope is not None else None
            km, vm = _meta(kb, keep), _meta(vb, keep)
            if km is None:  # the tile holds the rotated keys
                keep.append(kb.tile_into(0, n, torch.empty(b, hkv, n, d), rot))
                km, rot = cpu.dense_meta(keep[-1], keep), None
            if vm is None:
                keep.append(vb.tile_into(0, n, torch.empty(b, hkv, n, d)))
                vm = cpu.dense_meta(keep[-1], keep)
        if km is None or vm is None:
            return None
        cos, sin = rot if rot is not None else (NO_ROT, NO_ROT)
        ops.decode_partial(q, torch.tensor(km, dtype=torch.int64), torch.tensor(vm, dtype=torch.int64), 0, n,
                           cos, sin, m, l, acc)
    out = (acc / l[..., None]).reshape(b, hq, 1, d).to(query.dtype)
    return out, (m + torch.log(l)).reshape(b, hq, 1)

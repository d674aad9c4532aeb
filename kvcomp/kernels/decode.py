"""One decode step's attention on the CPU straight from the packed codes: ``decode_layer_cpu`` (one kernel call
per layer-step, ``cpu_layer_src.py`` ``decode_layer``; what the layer runs) and ``decode_attention_cpu`` (one call
per segment, ``cpu_src.py`` ``decode_partial`` / ``decode_partial_generic``; the per-segment path the tests hold
the layer entry to).

For one query step ``q`` ``[B, Hq, 1, D]`` over a layer's history (``chunk.History``) and this step's own
post-RoPE ``new_k``/``new_v`` ``[B, Hkv, 1, D]``::

    out = softmax([q·K_hist^T | q·k_new] * scale) @ [V_hist | v_new]

Each stored block pair describes itself to the kernel (``decode_meta``: dense, packed, or channel-split
rows); the kernel decodes K rows in registers, re-applies RoPE at the stored positions (cos/sin rows of the
rope's table), scores the ``G`` query heads of each KV head, and folds V rows into an online softmax, the
block's tokens split over the threads (flash-decoding), the partial states merged in place. A block the kernel
cannot read (sparse outliers, shared beam rows, another storage type) is first written as a float32 tile by
its own ``tile_into`` and read as a dense source. The layer entry reads the stored segments through a plan
(``LayerPlan``: their meta rows stacked, kept on the store while its ``version`` stays) and the residual and
this step's K/V as a full-precision tail. Returns (out ``[B, Hq, 1, D]``, lse ``[B, Hq, 1]``), or None
where the kernels are off or the model's RoPE is not the split-half rotation (the tiled path runs instead).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.kernels import cpu
from kvcomp.kernels.cpu import NO_ROT

NO_POS = torch.empty(0, dtype=torch.int32)


def _dense(x: torch.Tensor, keep: list[torch.Tensor]) -> torch.Tensor | None:
    row = cpu.dense_meta(x, keep)
    return None if row is None else torch.tensor(row, dtype=torch.int64)


def half_table(rope: Any, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rope's cos/sin table ``[P, D]`` reaching position ``top``, as its first halves ``[P, D/2]`` when both
    halves are equal (the LLaMA table: one frequency per channel pair), so the kernel reads half the bytes per
    token; else the table itself. Checked and copied once per table (the rope's current table is held beside
    the copy, so a replaced table is recognised by identity)."""
    cos, sin = rope.table(top)
    hit = _HALF.get(rope)
    if hit is None or hit[0] is not cos or hit[1] is not sin:
        h = cos.shape[-1] // 2
        same = cos.shape[-1] % 2 == 0 and torch.equal(cos[:, :h], cos[:, h:]) and torch.equal(sin[:, :h], sin[:, h:])
        hit = _HALF[rope] = (cos, sin, *((cos[:, :h].contiguous(), sin[:, :h].contiguous()) if same else (cos, sin)))
    return hit[2], hit[3]


_HALF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def history_top(history: Any) -> int:
    """1 + the largest stored position (the rope table must reach it)."""
    tops = [int(p.max()) + 1 for _, _, p in history.segments() if p.numel()]
    return max(tops, default=0)


def _meta(block: Any, keep: list[torch.Tensor]) -> torch.Tensor | None:
    """The block's decode meta row as an int64 tensor (what it points into goes to ``keep``), cached on the block
    (stored blocks never change) unless it needed transients built for this call (contiguous copies)."""
    cached = block.__dict__.get("_decode_meta") if hasattr(block, "__dict__") else None
    if cached is not None:
        return cached
    fn = getattr(block, "decode_meta", None)
    mine: list[torch.Tensor] = []
    row = None if fn is None else fn(mine)
    meta = None if row is None else torch.tensor(row, dtype=torch.int64)
    keep += mine
    if meta is not None and not mine and hasattr(block, "__dict__"):
        block.__dict__["_decode_meta"] = meta
    return meta


def meta_tile(block: Any, t0: int, out: torch.Tensor, rot: Any = None) -> bool:
    """Tokens ``[t0, t0 + n)`` of a stored ``block`` into float32 ``out`` ``[B, H, n, D]`` (rotated by ``rot`` = (cos,
    sin) ``[n, D]`` when given) in one compiled pass from the block's decode meta row (``cpu_tile_src.py``); False
    where there is no kernel or it cannot read the block (the caller's own path runs)."""
    ops = cpu.on(out)
    if ops is None:
        return False
    keep: list[torch.Tensor] = []
    meta = _meta(block, keep)
    if meta is None:
        return False
    ops.meta_tile(meta, t0, out, *(rot or (NO_ROT, NO_ROT)))
    return True


def _sources(kb: Any, vb: Any, pos: torch.Tensor, rope: Any, shape: tuple[int, int, int],
             keep: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """Meta rows of a stored segment's K and V blocks; a block the kernel cannot read is first written as a float32
    tile (keys rotated at ``pos`` there) that goes to ``keep``. Returns (K meta, V meta, whether the kernel must
    still rotate the keys); a meta is None where even the tile is unreadable."""
    b, hkv, d = shape
    n = int(kb.shape[2])
    km, vm = _meta(kb, keep), _meta(vb, keep)
    rotate = rope is not None
    if km is None:  # the tile holds the rotated keys
        keep.append(kb.tile_into(0, n, torch.empty(b, hkv, n, d), rope.lookup(pos) if rotate else None))
        km, rotate = _dense(keep[-1], keep), False
    if vm is None:
        keep.append(vb.tile_into(0, n, torch.empty(b, hkv, n, d)))
        vm = _dense(keep[-1], keep)
    return km, vm, rotate


@dataclass
class LayerPlan:
    """A layer's stored segments as ``decode_layer`` reads them: stacked meta rows ``[S, 48]`` of K and V, ``seg``
    ``[S, 3]`` (tokens, address of the int32 positions or 0, 1 + the largest position), and what they point into."""

    kmeta: torch.Tensor
    vmeta: torch.Tensor
    seg: torch.Tensor
    keep: list[Any]


def _plan(history: Any, rope: Any, shape: tuple[int, int, int]) -> tuple[LayerPlan, bool]:
    """The plan of ``history``'s stored segments (its residual excluded) and whether it can be kept until the
    store changes (False where a segment needed transients built for this call: tiles, contiguous copies)."""
    krows, vrows, seg, keep = [], [], [], []
    lasting = True
    for kb, vb, pos in zip(history.k_blocks, history.v_blocks, history.pos_blocks, strict=True):
        mine: list[torch.Tensor] = []
        n = int(kb.shape[2])
        km, vm, rotate = _sources(kb, vb, pos, rope, shape, mine)
        if km is None or vm is None:
            raise _Unreadable
        lasting = lasting and not mine
        p32 = pos.to(torch.int32).contiguous() if rotate else NO_POS
        keep += [kb, vb, p32, *mine]
        krows.append(km)
        vrows.append(vm)
        seg.append([n, p32.data_ptr() if rotate and n else 0, int(p32.max()) + 1 if rotate and n else 0])
    cpu_meta = [torch.stack(r) if r else torch.zeros(0, cpu.META, dtype=torch.int64) for r in (krows, vrows)]
    return LayerPlan(*cpu_meta, torch.tensor(seg, dtype=torch.int64).reshape(-1, 3), keep), lasting


class _Unreadable(Exception):
    """A segment the kernel cannot read, even as a tile."""


def layer_plan(history: Any, rope: Any, shape: tuple[int, int, int]) -> LayerPlan:
    """``_plan`` of ``history``, taken from its store when the store has not changed since the history was taken
    (``store.version``), else built (and left on the store for the next step when it can be kept)."""
    store = history.store
    hit = None if store is None else store.plan
    if hit is not None and hit[0] == history.version:
        return hit[1]
    plan, lasting = _plan(history, rope, shape)
    if lasting and store is not None and store.version == history.version:
        store.plan = (history.version, plan)
    return plan


def _tail(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.no_grad()
def decode_layer_cpu(query: torch.Tensor, history: Any, new_k: torch.Tensor, new_v: torch.Tensor, scale: float,
                     rope: Any, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One kernel call for the whole layer (``decode_layer``): the stored segments' plan (kept on the store
    between steps), the residual and this step's own K/V as the full-precision tail. Same contract as
    ``decode_attention_cpu``."""
    ops = cpu.on(query)
    b, hq, q_len, d = query.shape
    hkv = new_k.shape[1]
    if ops is None or q_len != 1 or (rope is not None and not rope.split_half(d)):
        return None
    tails = [new_k, new_v] + ([] if history.res_k is None else [history.res_k, history.res_v])
    if any(x.dtype not in cpu.DTYPES for x in tails):
        return None
    try:
        plan = layer_plan(history, rope, (b, hkv, d))
    except _Unreadable:
        return None
    dense = [_tail(new_k), _tail(new_v), NO_POS]
    if history.res_k is not None:
        rp = history.res_pos.to(torch.int32) if rope is not None else NO_POS
        dense = [_tail(history.res_k), _tail(history.res_v), rp, *dense]
    table = half_table(rope, history_top(history) if top is None else top) if rope is not None else (NO_ROT, NO_ROT)
    out, lse = ops.decode_layer(query.reshape(b, hkv, hq // hkv, d), scale, plan.kmeta, plan.vmeta, plan.seg, dense,
                                *table)
    return out.to(query.dtype), lse


@torch.no_grad()
def decode_attention_cpu(query: torch.Tensor, history: Any, new_k: torch.Tensor, new_v: torch.Tensor, scale: float,
                         rope: Any, generic: bool = False, top: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``generic``: the generic kernel (``decode_partial_generic``) instead of the vectorised one (the tests hold
    both to the oracle); ``top``: 1 + the largest stored position when the caller knows a bound (the step's own
    position), else each segment's positions are scanned."""
    ops = cpu.on(query)
    b, hq, q_len, d = query.shape
    hkv = new_k.shape[1]
    if ops is None or q_len != 1 or (rope is not None and not rope.split_half(d)):
        return None
    kernel = ops.decode_partial_generic if generic else ops.decode_partial
    g = hq // hkv
    q = (query.float().reshape(b, hkv, g, d) * scale).contiguous()
    m = torch.full((b, hkv, g), float("-inf"))
    l, acc = torch.zeros(b, hkv, g), torch.zeros(b, hkv, g, d)
    table = half_table(rope, history_top(history) if top is None else top) if rope is not None else None
    segs = [*history.segments(), (new_k, new_v, None)]
    for kb, vb, pos in segs:
        keep: list[torch.Tensor] = []
        n = int(kb.shape[2])
        if pos is None:  # this step's own post-RoPE K/V
            km, vm, rot = _dense(kb, keep), _dense(vb, keep), None
        else:
            km, vm, rotate = _sources(kb, vb, pos, rope, (b, hkv, d), keep)
            rot = table if rotate else None
        if km is None or vm is None:
            return None
        cos, sin = rot if rot is not None else (NO_ROT, NO_ROT)
        p32 = pos if rot is not None and pos.dtype == torch.int32 else (NO_POS if rot is None else pos.to(torch.int32))
        kernel(q, km, vm, 0, n, p32, cos, sin, m, l, acc)
    out = (acc / l[..., None]).reshape(b, hq, 1, d).to(query.dtype)
    return out, (m + torch.log(l)).reshape(b, hq, 1)

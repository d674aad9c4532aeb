"""Launch plan of the Triton decode kernel: which blocks it reads, grouped by layout, as address tables.

A block pair is fused when K and V are each ``Packed`` at 2/4/8 bits, or ``Sparse`` over such a base,
of one shape ``[B, Hkv, T, D]``. Pairs with the same layout signature (widths, axes, stat and outlier
dtypes, sparsity) share one launch, described by

- ``meta`` int64 ``[n_blocks, 19]``, one row per block: addresses of K codes/scale/zero, V
  codes/scale/zero, int32 positions (0 without RoPE), then ``T`` (the layout's token count: a width
  arena's capacity), K ``n_groups``/``group``, V ``n_groups``/``group``, then for K and for V: outlier
  index/values addresses and the address of the outlier tile pointers (int64 ``[B*H, ceil(T / block_t) + 1]``,
  from ``searchsorted``), 0 if not sparse; last the number of stored tokens ``n <= T`` the kernel reads;
- ``splits`` int32 ``[n_programs, 2]``: (row in ``meta``, first token) per ``split`` tokens of a block.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

NMETA = 19
FUSED_BITS = (2, 4, 8)
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _parts(block: Any) -> tuple[Any, Any | None] | None:
    """(packed base, sparse wrapper or None) when the kernel can read ``block`` (the block says so through its
    ``fused_parts(FUSED_BITS)``), else None."""
    fn = getattr(block, "fused_parts", None)
    return None if fn is None else fn(FUSED_BITS)


def _tile_ptrs(sp: Any, block_t: int) -> torch.Tensor:
    """int64 ``[B*H, n_tiles + 1]``: where each ``block_t``-token tile's outliers start in ``sp.index``."""
    b, h, t, d = sp.shape
    rows = torch.arange(b * h, device=sp.index.device).view(-1, 1)
    starts = torch.arange(0, t + block_t, block_t, device=sp.index.device).clamp_max(t).view(1, -1)
    bounds = ((rows * t + starts) * d).reshape(-1)
    return torch.searchsorted(sp.index, bounds.to(sp.index.dtype)).view(b * h, -1).to(torch.int64)


def _row(keep: list[torch.Tensor], kp: Any, vp: Any, ksp: Any | None, vsp: Any | None,
         pos: torch.Tensor | None, block_t: int, n: int) -> list[int]:
    """One block's table row. Tensors the blocks hold stay theirs (the plan must not keep a reset layer's
    blocks alive); copies made here (non-contiguous inputs, outlier tile pointers) go to ``keep``."""

    def ptr(x: torch.Tensor) -> int:
        y = x.contiguous()
        if y is not x:
            keep.append(y)
        return y.data_ptr()

    pos32 = None if pos is None else pos.to(torch.int32)
    if pos32 is not None and pos32 is not pos:
        keep.append(pos32)
    row = [ptr(kp.codes), ptr(kp.scale), ptr(kp.zero), ptr(vp.codes), ptr(vp.scale), ptr(vp.zero),
           0 if pos32 is None else ptr(pos32), kp.shape[2],
           kp.scale.shape[-2], kp.group, vp.scale.shape[-2], vp.group]
    for sp in (ksp, vsp):
        if sp is not None:
            keep.append(_tile_ptrs(sp, block_t))
        row += [0, 0, 0] if sp is None else [ptr(sp.index), ptr(sp.values), keep[-1].data_ptr()]
    return [*row, n]


def plan(layer: Any, block_t: int, split: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Launch groups (one per block layout: tables + constexprs) and the indices of the other blocks.

    Cached per layer while its blocks are the same objects (checked through weak references, so a reset
    layer's blocks are freed as usual; blocks are only ever appended, or all dropped by ``reset``)."""
    blocks = [*layer.k_blocks, *layer.v_blocks]
    hit = _PLANS.get(layer)
    if hit is not None and hit[0] == (block_t, split, len(blocks)) and all(r() is b for r, b in zip(hit[1], blocks)):
        return hit[2]
    rope = layer.rope is not None
    groups: dict[tuple, dict[str, Any]] = {}
    other: list[int] = []
    for i, (kb, vb, pos) in enumerate(zip(layer.k_blocks, layer.v_blocks, layer.pos_blocks, strict=True)):
        kpart, vpart = _parts(kb), _parts(vb)
        if kpart is None or vpart is None or kb.shape != vb.shape:
            other.append(i)
            continue
        (kp, ksp), (vp, vsp) = kpart, vpart
        if kp.shape[2] != vp.shape[2]:  # one layout T addresses both
            other.append(i)
            continue
        sig = (kp.bits, vp.bits, kp.axis == "token", vp.axis == "token", ksp is not None, vsp is not None,
               kp.scale.dtype, vp.scale.dtype, ksp.values.dtype if ksp else torch.float16,
               vsp.values.dtype if vsp else torch.float16)
        grp = groups.setdefault(sig, {"sig": sig, "rows": [], "splits": [], "keep": []})
        grp["splits"] += [(len(grp["rows"]), s) for s in range(0, kb.shape[2], split)]
        grp["rows"].append(_row(grp["keep"], kp, vp, ksp, vsp, pos if rope else None, block_t, kb.shape[2]))
    dev = layer.device
    out = []
    for grp in groups.values():
        grp["meta"] = torch.tensor(grp.pop("rows"), dtype=torch.int64, device=dev)
        grp["splits"] = torch.tensor(grp["splits"], dtype=torch.int32, device=dev)
        out.append(grp)
    _PLANS[layer] = ((block_t, split, len(blocks)), [weakref.ref(b) for b in blocks], (out, other))
    return out, other

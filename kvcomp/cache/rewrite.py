"""Re-encode a layer's held history at lower widths or drop tokens from it (a late, question-aware pass).

``demote(layer, bits)`` takes one width per held token (``[held]``, in the layer's order: packed blocks,
then the residual; 0 = drop, -1 = keep as is) and never raises a width: a token ends at
``min(its width, bits)``. A slot (``arena.py``) with no change is left as stored (bit-exact); in a changed
slot, the tokens whose width stays are copied as stored where the slot is a width arena (bit-exact), and the
others (all kept tokens of a changed page) are dequantized and re-encoded with the quantizer's ``store``
(statistics not updated) at their old or lowered widths, so a page's unchanged tokens may move by up to half a
step of the new grid. The layer's arena is rebuilt from the result.
Residual (full-precision, not yet flushed) tokens can only be dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcomp.cache.arena import Arena, arena_key


def _rows(block: Any, idx: torch.Tensor) -> Any:
    """Tokens ``idx`` of an arena-layout block, their stored rows copied (bit-exact)."""
    parts = [p.index_select(1, idx) for p in block.arena_parts()]
    return block.arena_view(parts, int(idx.numel()))


def held_positions(layer: Any) -> torch.Tensor:
    """Absolute positions ``[held]`` of a layer's tokens, in its storage order (blocks, then residual)."""
    parts = list(layer.pos_blocks) + ([] if layer.res_pos is None else [layer.res_pos])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def demote(layer: Any, bits: torch.Tensor) -> int:
    """Apply widths ``bits`` [held] to ``layer`` (no promotion); returns the number of tokens dropped."""
    if bits.numel() != layer.held():
        raise ValueError(f"layer {layer.layer_idx}: {bits.numel()} widths for {layer.held()} held tokens")
    arena = Arena()
    o = dropped = 0
    for kb, vb, pos in layer.arena.segments():
        n = int(pos.numel())
        want = bits[o : o + n].to(pos.device)
        o += n
        w = kb.width
        target = torch.where((want >= 0) & (want < w), want, torch.full_like(want, w))
        same = target == w
        if bool(same.all()):
            arena.append(kb, vb, pos)
            continue
        keep = target != 0
        dropped += int((~keep).sum())
        if arena_key(kb) is not None and arena_key(vb) is not None:  # arena rows: unchanged tokens copied as stored
            idx = same.nonzero().squeeze(1)
            if idx.numel():
                arena.append(_rows(kb, idx), _rows(vb, idx), pos[idx])
            keep = keep & ~same
        if not bool(keep.any()):
            continue
        # a dense block is re-stored in its own dtype (bit-exact); codes are decoded to float32
        dtype = kb.tensors()[0].dtype if w >= 16 else torch.float32
        k, v = kb.dequantize(dtype)[..., keep, :], vb.dequantize(dtype)[..., keep, :]
        kept_pos = pos[keep]
        for seg in layer.quantizer.store(k, v, kept_pos, layer.state, target[keep]):
            arena.append(seg.keys, seg.values, kept_pos if seg.index is None else kept_pos[seg.index])
    layer.arena = arena
    if layer.res_pos is not None:
        keep = bits[o:].to(layer.res_pos.device) != 0
        dropped += int((~keep).sum())
        if not bool(keep.all()):
            layer.res_k, layer.res_v = layer.res_k[..., keep, :], layer.res_v[..., keep, :]
            layer.res_pos, layer.res_score = layer.res_pos[keep], layer.res_score[keep]
            if layer.res_pos.numel() == 0:
                layer.res_k = layer.res_v = layer.res_pos = layer.res_score = None
    layer.dropped += dropped
    return dropped

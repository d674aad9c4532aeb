"""Re-encode a layer's held history at lower widths or drop tokens from it (a late, question-aware pass).

``demote(layer, bits)`` takes one width per held token (``[held]``, in the layer's order: packed blocks,
then the residual; 0 = drop, -1 = keep as is) and never raises a width: a token ends at
``min(its width, bits)``. A block with no change is left untouched (bit-exact); a changed block is
dequantized and its kept tokens re-encoded with the quantizer's ``store`` (statistics not updated), at
their old or lowered widths, so unchanged tokens of that block may move by up to half a step of the
new grid. Residual (full-precision, not yet flushed) tokens can only be dropped.
"""

from __future__ import annotations

from typing import Any

import torch


def held_positions(layer: Any) -> torch.Tensor:
    """Absolute positions ``[held]`` of a layer's tokens, in its storage order (blocks, then residual)."""
    parts = list(layer.pos_blocks) + ([] if layer.res_pos is None else [layer.res_pos])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def demote(layer: Any, bits: torch.Tensor) -> int:
    """Apply widths ``bits`` [held] to ``layer`` (no promotion); returns the number of tokens dropped."""
    if bits.numel() != layer.held():
        raise ValueError(f"layer {layer.layer_idx}: {bits.numel()} widths for {layer.held()} held tokens")
    k_blocks, v_blocks, p_blocks = [], [], []
    o = dropped = 0
    for kb, vb, pos in zip(layer.k_blocks, layer.v_blocks, layer.pos_blocks, strict=True):
        n = int(pos.numel())
        want = bits[o : o + n].to(pos.device)
        o += n
        w = kb.width
        target = torch.where((want >= 0) & (want < w), want, torch.full_like(want, w))
        if bool((target == w).all()):
            k_blocks.append(kb)
            v_blocks.append(vb)
            p_blocks.append(pos)
            continue
        keep = target != 0
        dropped += int((~keep).sum())
        if not bool(keep.any()):
            continue
        # a dense block is re-stored in its own dtype (bit-exact); codes are decoded to float32
        dtype = kb.tensors()[0].dtype if w >= 16 else torch.float32
        k, v = kb.dequantize(dtype)[..., keep, :], vb.dequantize(dtype)[..., keep, :]
        kept_pos = pos[keep]
        for seg in layer.quantizer.store(k, v, kept_pos, layer.state, target[keep]):
            k_blocks.append(seg.keys)
            v_blocks.append(seg.values)
            p_blocks.append(kept_pos if seg.index is None else kept_pos[seg.index])
    layer.k_blocks, layer.v_blocks, layer.pos_blocks = k_blocks, v_blocks, p_blocks
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

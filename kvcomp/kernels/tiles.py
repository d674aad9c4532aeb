"""Token-range dequantization of stored blocks, straight from the packed representation.

``dequantize_tokens(block, t0, t1, out)`` writes tokens ``[t0, t1)`` of a stored ``[B, H, T, D]`` block
into ``out`` ``[B, H, t1 - t0, D]`` (float32) without dequantizing the rest of the block. Every
transient is tile-sized. Addressing is the one the Triton kernel uses, so this file is also the spec of
what the kernel reads:

- codes (``Packed.codes``, flat uint8): element ``e = ((b * H + h) * T + t) * D + d`` (row-major
  ``[B, H, T, D]``); 2/4/8 bit: byte ``e // (8 / bits)``, bit offset ``(e % (8 / bits)) * bits``;
  3 bit: 24-bit word ``e // 8`` (3 bytes, little-endian), bit offset ``(e % 8) * 3``;
- scale / zero (fp16, or fp32 where fp16 would overflow), grouped view ``[..., n_groups, 1]``:
  ``axis="token"``: index ``((b * H + h) * T + t) * n_groups + d // group`` (``group`` channels);
  ``axis="channel"``: index ``((b * H + h) * D + d) * n_groups + t // group`` (``group`` tokens);
- value ``x = code * scale + zero``; ``Sparse`` outliers (sorted int32 flat indices ``e``, fp16/fp32
  values) replace the element; ``ChannelSplit`` columns ``h * D + d`` come from the ``special`` block.
"""

from __future__ import annotations

import torch

from kvcomp.cache.quant import ChannelSplit, Packed, Sparse
from kvcomp.cache.storage import Dense, Stored


def dequantize_tokens(block: Stored, t0: int, t1: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens ``[t0, t1)`` of ``block`` as float32 ``[B, H, t1 - t0, D]``, written into ``out`` when given."""
    b, h, _, d = block.shape
    if out is None:
        out = torch.empty(b, h, t1 - t0, d, dtype=torch.float32, device=_device(block))
    if isinstance(block, Dense):
        out.copy_(block.data[..., t0:t1, :])
    elif isinstance(block, Packed):
        _packed(block, t0, t1, out)
    elif isinstance(block, Sparse):
        dequantize_tokens(block.base, t0, t1, out)
        idx, local = outliers_in(block.index, block.shape, t0, t1)
        out.view(-1)[local] = block.values[idx].float()
    elif isinstance(block, ChannelSplit):
        _channel_split(block, t0, t1, out)
    else:  # an unknown storage type: whole-block fallback (still correct, not tile-sized)
        out.copy_(block.dequantize(torch.float32)[..., t0:t1, :])
    return out


def _device(block: Stored) -> torch.device:
    return block.tensors()[0].device


def _packed(p: Packed, t0: int, t1: int, out: torch.Tensor) -> None:
    b, h, t, d = p.shape
    dev = p.codes.device
    bh = torch.arange(b * h, device=dev).view(-1, 1, 1)
    tt = torch.arange(t0, t1, device=dev).view(1, -1, 1)
    dd = torch.arange(d, device=dev).view(1, 1, -1)
    e = (bh * t + tt) * d + dd  # [B*H, n, D] flat element index
    code = unpack_at(p.codes, p.bits, e)
    ng = p.scale.shape[-2]
    si = (bh * t + tt) * ng + dd // p.group if p.axis == "token" else (bh * d + dd) * ng + tt // p.group
    o = out.view(b * h, t1 - t0, d)
    torch.mul(code.float(), p.scale.reshape(-1)[si].float(), out=o)
    o.add_(p.zero.reshape(-1)[si].float())


def unpack_at(codes: torch.Tensor, bits: int, e: torch.Tensor) -> torch.Tensor:
    """Codes (int32) at flat element indices ``e`` (any shape) of a flat packed uint8 tensor."""
    if bits == 8:
        return codes[e].to(torch.int32)
    mask = (1 << bits) - 1
    if bits == 3:
        w = (e // 8) * 3
        word = codes[w].int() | (codes[w + 1].int() << 8) | (codes[w + 2].int() << 16)
        return (word >> ((e % 8) * 3).int()) & mask
    per = 8 // bits
    return (codes[e // per].int() >> ((e % per) * bits).int()) & mask


def outliers_in(index: torch.Tensor, shape: tuple[int, int, int, int], t0: int, t1: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Outliers of a ``Sparse`` block that fall in tokens ``[t0, t1)``.

    ``index``: sorted int32 flat indices into ``[B, H, T, D]``. Returns (positions into ``index``,
    flat indices into the ``[B, H, t1 - t0, D]`` tile). One ``searchsorted`` per (b, h) row: the cost
    is the tile's outliers, not all of the block's.
    """
    b, h, t, d = shape
    dev = index.device
    rows = torch.arange(b * h, device=dev, dtype=torch.int64)
    lo = torch.searchsorted(index, ((rows * t + t0) * d).to(index.dtype))
    hi = torch.searchsorted(index, ((rows * t + t1) * d).to(index.dtype))
    counts = hi - lo
    n = int(counts.sum())
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty
    start = torch.repeat_interleave(lo - (torch.cumsum(counts, 0) - counts), counts)
    pos = torch.arange(n, device=dev) + start
    e = index[pos].long()
    row, rem = e // (t * d), e % (t * d)
    local = (row * (t1 - t0) + rem // d - t0) * d + rem % d
    return pos, local


def _channel_split(c: ChannelSplit, t0: int, t1: int, out: torch.Tensor) -> None:
    b, h, _, d = c.shape
    n = t1 - t0
    cols = c.cols.long()
    keep = torch.ones(h * d, dtype=torch.bool, device=cols.device)
    keep[cols] = False
    flat = torch.empty(b, n, h * d, dtype=torch.float32, device=cols.device)
    flat[..., keep] = dequantize_tokens(c.normal, t0, t1).reshape(b, n, -1)
    flat[..., cols] = dequantize_tokens(c.special, t0, t1).reshape(b, n, -1)
    out.copy_(flat.view(b, n, h, d).transpose(1, 2))

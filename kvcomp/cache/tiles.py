"""Token-range dequantization of stored blocks in plain torch: the fallback and oracle of the compiled kernels.

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

import sys
from bisect import bisect_left
from typing import Any

import torch

from kvcomp.kernels.cpu import rotate_rows  # noqa: F401 - re-exported for the storage types


def dequantize_tokens(block: Any, t0: int, t1: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens ``[t0, t1)`` of ``block`` as float32 ``[B, H, t1 - t0, D]``, written into ``out`` when given: the
    block's own plain-torch tile (``tile_reference``), the oracle of its compiled ``tile_into``."""
    b, h, _, d = block.shape
    if out is None:
        out = torch.empty(b, h, t1 - t0, d, dtype=torch.float32, device=_device(block))
    block.tile_reference(t0, t1, out)
    return out


def packed_reference(p: Any, t0: int, t1: int, out: torch.Tensor) -> None:
    """A ``Packed`` tile: codes sliced per row when the layout allows it, else gathered element by element."""
    if _sliceable(p):
        _packed_tile(p, t0, t1, out)
    elif out.is_contiguous():
        _packed(p, t0, t1, out)
    else:
        tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        _packed(p, t0, t1, tmp)
        out.copy_(tmp)


def sparse_outliers_into(sp: Any, t0: int, t1: int, out: torch.Tensor) -> None:
    """Write a ``Sparse`` block's outliers of tokens ``[t0, t1)`` over its base's tile ``out``."""
    idx, local = outliers_in(sp.index, sp.shape, t0, t1)
    if idx.numel():
        b, h, n, d = out.shape
        bh, rem = local // (n * d), local % (n * d)
        out[bh // h, bh % h, rem // d, rem % d] = sp.values[idx].float()


def _device(block: Any) -> torch.device:
    return block.tensors()[0].device


def _packed(p: Any, t0: int, t1: int, out: torch.Tensor) -> None:
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


def _per(bits: int) -> int:
    return 8 if bits == 3 else 8 // bits


def _sliceable(p: Any) -> bool:
    b, h, _, d = p.shape
    rows_ok = d % _per(p.bits) == 0 or b * h == 1
    return rows_ok and (p.axis == "channel" or d % p.group == 0)


_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    key = (bits, device)
    if key not in _SHIFTS:
        dtype = torch.int32 if bits == 3 else torch.uint8
        _SHIFTS[key] = torch.arange(_per(bits), dtype=dtype, device=device) * bits
    return _SHIFTS[key]


def _unpack_bytes(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes ``[..., m]`` (``m`` whole words) -> codes ``[..., m * codes_per_byte]`` (uint8 or int32).

    2/4 bit: each byte is widened to 16/32 bits and its codes moved into separate bytes with a few vectorised
    integer ops on the wide words (a broadcast shift over uint8 is ~4x slower on CPU); the wide words viewed as
    bytes are the codes in order on a little-endian host."""
    if bits == 8:
        return c
    if bits == 3:
        w = c.unflatten(-1, (-1, 3)).int()
        word = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16)
        return ((word.unsqueeze(-1) >> _shifts(3, c.device)) & 7).flatten(-2)
    if sys.byteorder != "little":
        return ((c.unsqueeze(-1) >> _shifts(bits, c.device)) & ((1 << bits) - 1)).flatten(-2)
    mask = (1 << bits) - 1
    x = c.to(torch.int16 if bits == 4 else torch.int32).contiguous()
    y = torch.bitwise_and(x, mask)
    for i in range(1, 8 // bits):  # code i (bits i*bits ...) moves to byte i (bits 8*i ...)
        y.bitwise_or_(torch.bitwise_and(x, mask << (i * bits)).bitwise_left_shift_(i * (8 - bits)))
    return y.view(torch.uint8)


def _codes(p: Any, t0: int, t1: int) -> torch.Tensor:
    """Codes of tokens ``[t0, t1)`` as ``[B*H, n, D]`` (uint8 or int32), read from contiguous byte ranges."""
    b, h, t, d = p.shape
    bh, n, per = b * h, t1 - t0, _per(p.bits)
    nb = 3 if p.bits == 3 else 1  # bytes per word
    if d % per == 0:
        c = p.codes.view(bh, t, d // per * nb)[:, t0:t1]
        return _unpack_bytes(c, p.bits)
    e0, e1 = t0 * d, t1 * d  # one (b, h) row: the tile is one flat element range
    w0, w1 = e0 // per, -(-e1 // per)
    flat = _unpack_bytes(p.codes[w0 * nb : w1 * nb], p.bits)
    return flat[e0 - w0 * per : e0 - w0 * per + n * d].view(1, n, d)


def _packed_tile(p: Any, t0: int, t1: int, out: torch.Tensor) -> None:
    b, h, t, d = p.shape
    n = t1 - t0
    code = _codes(p, t0, t1).view(b, h, n, d)
    ng = p.scale.shape[-2]
    if p.axis == "token":
        g = d // ng
        scale = p.scale.view(b, h, t, ng, 1)[:, :, t0:t1].float()
        zero = p.zero.view(b, h, t, ng, 1)[:, :, t0:t1].float()
        torch.addcmul(zero, code.view(b, h, n, ng, g), scale, out=out.unflatten(-1, (ng, g)))
        return
    g0 = t0 // p.group
    if (t1 - 1) // p.group == g0:  # one group (e.g. a whole block per channel): broadcast, no gather
        scale = p.scale.view(b, h, d, ng)[..., g0 : g0 + 1].float().transpose(-1, -2)  # [B, H, 1, D]
        zero = p.zero.view(b, h, d, ng)[..., g0 : g0 + 1].float().transpose(-1, -2)
    else:
        gi = torch.arange(t0, t1, device=p.codes.device) // p.group
        scale = p.scale.view(b, h, d, ng).index_select(-1, gi).float().transpose(-1, -2)  # [B, H, n, D]
        zero = p.zero.view(b, h, d, ng).index_select(-1, gi).float().transpose(-1, -2)
    torch.addcmul(zero, code, scale, out=out)


def channel_split_reference(c: Any, t0: int, t1: int, out: torch.Tensor) -> None:
    """Both parts dequantized into contiguous buffers, then copied into ``out`` by column runs (``_runs``): a few
    slice copies instead of a gather or scatter along the last dim (slow on CPU)."""
    b = c.shape[0]
    n = t1 - t0
    parts = [dequantize_tokens(p, t0, t1, torch.empty(b, 1, n, p.shape[-1], device=out.device))
             for p in (c.normal, c.special)]
    for part, h, d0, d1, s0 in _runs(c):
        out[:, h, :, d0:d1].copy_(parts[part][:, 0, :, s0 : s0 + d1 - d0])


def _runs(c: Any) -> list[tuple[int, int, int, int, int]]:
    """``column_runs`` of a block, computed once per block."""
    runs = getattr(c, "_runs", None)
    if runs is None:
        runs = column_runs(c.shape[1], c.shape[3], c.cols)
        object.__setattr__(c, "_runs", runs)
    return runs


def column_runs(h: int, d: int, cols: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """How a ``ChannelSplit`` lays out flat columns ``h * D + d`` (``cols`` sorted ascending: the ``special`` part,
    the rest in order: ``normal``): (part 0 normal / 1 special, head, first channel, end channel, first column
    in the part) for each run of columns adjacent in one head and one part."""
    cl = cols.tolist()
    special = {col: j for j, col in enumerate(cl)}
    bounds = sorted({*range(0, h * d + 1, d), *cl, *(x + 1 for x in cl)})
    runs = []
    for a, e in zip(bounds, bounds[1:], strict=False):
        hh, d0 = divmod(a, d)
        src = special[a] if a in special else a - bisect_left(cl, a)
        runs.append((int(a in special), hh, d0, d0 + e - a, src))
    return runs

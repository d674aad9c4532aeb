"""Quantized storage blocks: bit-packed codes with scales and zero points, sparse outliers, channel splits.

Asymmetric uniform quantization of a group ``x_g`` with ``bits`` bits (levels ``L = 2**bits - 1``)::

    zero = min(x_g)  (stored fp16, rounded down),  scale = (max(x_g) - zero) / L  (fp16, rounded up)
    code = clamp(round((x - zero) / scale), 0, L)        x_hat = code * scale + zero

so ``|x - x_hat| <= scale / 2`` for every element inside the range. Groups run along the head dim
(``axis="token"``: per-token, ``group`` channels per group) or along the tokens (``axis="channel"``:
per-channel, ``group`` tokens per group; 0 = the whole block). Scales fall back to fp32 only where a
statistic is outside fp16's range, so huge inputs never turn into Inf/NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcomp.cache import tiles
from kvcomp.cache.packing import pack_float, unpack
from kvcomp.cache.slices import PackedSlice
from kvcomp.cache.storage import Stored
from kvcomp.kernels import cpu, decode
from kvcomp.kernels.cpu import NO_ROT

FP16_MAX = 60000.0


def _grouped(x: torch.Tensor, axis: str, group: int) -> tuple[torch.Tensor, int]:
    """``[B, H, T, D]`` -> ``[..., n_groups, g]`` along the reduced axis (padded by repeating the last entry)."""
    if axis == "channel":
        x = x.transpose(-1, -2)
    n = x.shape[-1]
    g = _group_size(n, group)
    pad = (-n) % g
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, g), g


def _group_size(n: int, group: int) -> int:
    """Elements per group along a reduced axis of ``n``: ``group``, or the whole axis (0 or ``group >= n``)."""
    return group if 0 < group < n else n


def _ungrouped(y: torch.Tensor, axis: str, shape: tuple[int, ...]) -> torch.Tensor:
    y = y.reshape(*y.shape[:-2], -1)
    n = shape[-2] if axis == "channel" else shape[-1]
    y = y[..., :n]
    return y.transpose(-1, -2) if axis == "channel" else y


def stat_dtype(*stats: torch.Tensor) -> torch.dtype:
    """fp16 for scales and zero points unless a statistic would overflow it."""
    big = max(float(s.abs().max()) if s.numel() else 0.0 for s in stats)
    return torch.float16 if big < FP16_MAX else torch.float32


def half_safe(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp16 when it fits, else in fp32 (never Inf from an overflow)."""
    return x.half() if stat_dtype(x) == torch.float16 else x.float()


@dataclass
class Packed:
    """``[B, H, T, D]`` block of ``bits``-bit codes (flat uint8), with ``scale``/``zero`` per group."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: tuple[int, int, int, int]
    axis: str
    group: int

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        q = unpack(self.codes, self.bits, math.prod(self.shape)).reshape(self.shape)
        qg, _ = _grouped(q, self.axis, self.group)
        x = qg.float() * self.scale.float() + self.zero.float()
        return _ungrouped(x, self.axis, self.shape).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.zero]

    def tile_into(self, t0: int, t1: int, out: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        ops = cpu.on(out)
        if ops is not None and self.bits in (2, 3, 4, 8):
            b, h, t, d = self.shape
            ops.packed_tile(self.codes, self.scale, self.zero, self.bits, b, h, t, d, self.axis == "token",
                            self.group, t0, out, *(rot or (NO_ROT, NO_ROT)))
            return out
        self.tile_reference(t0, t1, out)
        return tiles.rotate_rows(out, rot)

    def tile_reference(self, t0: int, t1: int, out: torch.Tensor) -> None:
        tiles.packed_reference(self, t0, t1, out)

    def fused_parts(self, bits: tuple[int, ...]) -> tuple[Packed, None] | None:
        """(self, no outliers) for the Triton kernel (``kernels/plan.py``) when it reads this width."""
        return (self, None) if self.bits in bits else None

    def decode_meta(self, keep: list[torch.Tensor]) -> list[int] | None:
        """How the compiled decode kernel reads this block (``kernels/cpu.py``), None if it cannot."""
        return cpu.packed_meta(self.codes, self.scale, self.zero, self.bits, self.shape, self.axis == "token",
                               self.group)

    def arena_key(self) -> tuple | None:
        """The layout a width arena (``arena.py``) shares: per-token groups, each token's codes whole bytes."""
        b, h, _, d = self.shape
        if self.axis != "token" or d % (8 if self.bits == 3 else 8 // self.bits):
            return None
        return "packed", self.bits, self.group, b, h, d, self.scale.dtype, self.codes.device

    def arena_parts(self) -> list[torch.Tensor]:
        """Codes, scales, zero points as ``[B*H, T, -1]`` token rows (what a width arena appends)."""
        b, h, t, _ = self.shape
        return [x.view(b * h, t, -1) for x in (self.codes, self.scale, self.zero)]

    def arena_block(self, rows: list[torch.Tensor], t: int) -> Packed:
        """A block of this layout over token rows ``rows`` (``arena_parts``' form) of ``t`` tokens."""
        b, h, _, d = self.shape
        return Packed(rows[0].view(-1), rows[1].view(b, h, t, -1, 1), rows[2].view(b, h, t, -1, 1), self.bits,
                      (b, h, t, d), self.axis, self.group)

    def arena_view(self, bufs: list[torch.Tensor], n: int) -> PackedSlice:
        """The first ``n`` tokens of a width arena's buffers ``bufs`` (``[B*H, capacity, -1]``)."""
        return PackedSlice(self.arena_block(bufs, bufs[0].shape[1]), n)

    @property
    def width(self) -> int:
        """Bits per element of the block's main storage."""
        return self.bits

    @property
    def n_outliers(self) -> int:
        return 0


def quantize(x: torch.Tensor, bits: int, axis: str = "token", group: int = 0,
             lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> Packed:
    """Quantize ``x`` [B, H, T, D] to a ``Packed`` block; range per group = its min/max, or the given
    ``lo``/``hi`` (broadcastable to the grouped view ``[..., n_groups, 1]``; values outside are clipped).
    On the CPU in one compiled pass (``cpu.quantize_pack``), bit-equal to ``quantize_reference``."""
    ops = cpu.on(x) if bits in (2, 3, 4, 8) and x.dim() == 4 and (lo is None) == (hi is None) else None
    if ops is None:
        return quantize_reference(x, bits, axis, group, lo, hi)
    shape = tuple(x.shape)
    n = shape[-1] if axis == "token" else shape[-2]
    g = _group_size(n, group)
    grouped = (*shape[:2], shape[-2] if axis == "token" else shape[-1], -(-n // g), 1)
    # an empty range tensor = "each group's own min / max"
    bounds = [x.new_empty(0, dtype=torch.float32) if b is None else b.float().expand(grouped).contiguous()
              for b in (lo, hi)]
    codes, scale, zero = ops.quantize_pack(x.float().contiguous(), *bounds, bits, axis == "token", g)
    return Packed(codes, scale, zero, bits, shape, axis, g)  # type: ignore[arg-type]


def quantize_reference(x: torch.Tensor, bits: int, axis: str = "token", group: int = 0,
                       lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> Packed:
    """``quantize`` in plain torch (any device; the oracle of the compiled pass)."""
    shape = tuple(x.shape)
    xg, g = _grouped(x.float(), axis, group)
    lo = xg.amin(dim=-1, keepdim=True) if lo is None else lo.float().expand(*xg.shape[:-1], 1)
    hi = xg.amax(dim=-1, keepdim=True) if hi is None else hi.float().expand(*xg.shape[:-1], 1)
    levels = (1 << bits) - 1
    sd = stat_dtype(lo, hi)
    zero = lo.to(sd)
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, torch.full_like(zero, -torch.inf)), zero)
    scale = (hi / levels - zero.float() / levels).clamp_min(0).to(sd)
    short = scale.float() * levels + zero.float() < hi
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    s = scale.float()
    q = ((xg - zero.float()) / torch.where(s > 0, s, torch.ones_like(s))).round_().clamp_(0, levels)
    codes = pack_float(_ungrouped(q, axis, shape), bits)
    return Packed(codes, scale, zero, bits, shape, axis, g)  # type: ignore[arg-type]


@dataclass
class Sparse:
    """Dense-and-sparse block: ``base`` plus fp16 ``values`` at int32 flat ``index`` into [B, H, T, D]."""

    base: Stored
    index: torch.Tensor
    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.base.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        x = self.base.dequantize(torch.float32).reshape(-1)
        x[self.index.long()] = self.values.float()
        return x.reshape(self.shape).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.base.tensors(), self.index, self.values]

    def tile_into(self, t0: int, t1: int, out: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        if decode.meta_tile(self, t0, out, rot):  # base, outliers and RoPE in one compiled pass
            return out
        self.base.tile_into(t0, t1, out)
        tiles.sparse_outliers_into(self, t0, t1, out)
        return cpu.rope_tile(out, rot)

    def tile_reference(self, t0: int, t1: int, out: torch.Tensor) -> None:
        self.base.tile_reference(t0, t1, out)
        tiles.sparse_outliers_into(self, t0, t1, out)

    def decode_meta(self, keep: list[torch.Tensor]) -> list[int] | None:
        """How the compiled decode kernel reads this block (``kernels/cpu.py``), None if it cannot."""
        fn = getattr(self.base, "decode_meta", None)
        return cpu.sparse_meta(None if fn is None else fn(keep), self.index, self.values, self.shape, keep)

    def fused_parts(self, bits: tuple[int, ...]) -> tuple[Stored, Sparse] | None:
        """(packed base, self) for the Triton kernel (``kernels/plan.py``) when it reads the base."""
        fn = getattr(self.base, "fused_parts", None)
        inner = None if fn is None else fn(bits)
        return (inner[0], self) if inner is not None and inner[1] is None else None

    @property
    def width(self) -> int:
        return self.base.width

    @property
    def n_outliers(self) -> int:
        return int(self.index.numel()) + self.base.n_outliers


def split_outliers(x: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elements with ``|x| > limit`` (broadcast): returns (x with them clamped, int32 flat index, fp16 values)."""
    mask = x.abs() > limit
    index = mask.reshape(-1).nonzero().squeeze(1)
    values = half_safe(x.reshape(-1)[index])
    clamped = torch.maximum(torch.minimum(x, limit), -limit)
    return clamped, index.to(torch.int32), values

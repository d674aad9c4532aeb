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

from bisect import bisect_left
from dataclasses import dataclass

import torch

from kvcomp.cache.packing import pack_float, unpack
from kvcomp.cache.storage import Stored

FP16_MAX = 60000.0


def _grouped(x: torch.Tensor, axis: str, group: int) -> tuple[torch.Tensor, int]:
    """``[B, H, T, D]`` -> ``[..., n_groups, g]`` along the reduced axis (padded by repeating the last entry)."""
    if axis == "channel":
        x = x.transpose(-1, -2)
    n = x.shape[-1]
    g = group if 0 < group < n else n
    pad = (-n) % g
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, g), g


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
        q = unpack(self.codes, self.bits, _numel(self.shape)).reshape(self.shape)
        qg, _ = _grouped(q, self.axis, self.group)
        x = qg.float() * self.scale.float() + self.zero.float()
        return _ungrouped(x, self.axis, self.shape).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.zero]

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
    ``lo``/``hi`` (broadcastable to the grouped view ``[..., n_groups, 1]``; values outside are clipped)."""
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


@dataclass
class ChannelSplit:
    """Block whose outlier columns ``cols`` (int32 flat ``h * D + d``) are stored apart, at another width.

    ``normal``/``special`` hold ``[B, 1, T, n]`` with the remaining / outlier columns of all heads.
    """

    normal: Stored
    special: Stored
    cols: torch.Tensor
    shape: tuple[int, int, int, int]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        b, h, t, d = self.shape
        cols = self.cols.long()
        out = torch.empty(b, t, h * d, dtype=dtype, device=self.cols.device)
        out.index_copy_(-1, rest_columns(h * d, cols), self.normal.dequantize(dtype).reshape(b, t, -1))
        out.index_copy_(-1, cols, self.special.dequantize(dtype).reshape(b, t, -1))
        return out.reshape(b, t, h, d).transpose(1, 2)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.normal.tensors(), *self.special.tensors(), self.cols]

    @property
    def width(self) -> int:
        return self.normal.width

    @property
    def n_outliers(self) -> int:
        b, _, t, _ = self.shape
        return b * t * int(self.cols.numel()) + self.normal.n_outliers


def columns(x: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` [B, H, T, D] into ([B, 1, T, n_rest], [B, 1, T, n_cols]) by flat column ``h * D + d``
    (``cols`` sorted ascending), copied run by run (``column_runs``): no gather along the last dim."""
    b, h, t, d = x.shape
    parts = [x.new_empty(b, 1, t, h * d - cols.numel()), x.new_empty(b, 1, t, cols.numel())]
    for part, hh, d0, d1, s0 in column_runs(h, d, cols):
        parts[part][:, 0, :, s0 : s0 + d1 - d0].copy_(x[:, hh, :, d0:d1])
    return parts[0], parts[1]


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


def rest_columns(n: int, cols: torch.Tensor) -> torch.Tensor:
    """The ``n - len(cols)`` column indices not in ``cols`` (distinct, int64), ascending, on ``cols``' device,
    without a device-to-host sync (a boolean-mask index would need one on CUDA)."""
    keep = torch.ones(n, dtype=torch.uint8, device=cols.device)
    keep[cols] = 0
    return torch.argsort(keep, descending=True, stable=True)[: n - cols.numel()]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

"""Channel-split blocks: a block whose outlier channels (flat columns ``h * D + d``) are stored apart, at another
width (KVQuant's outlier channels, ``quantizer=kvquant_stream``), and the column helpers that split a tensor so."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomp.cache import tiles
from kvcomp.cache.storage import Stored
from kvcomp.cache.tiles import column_runs
from kvcomp.kernels import cpu, decode
from kvcomp.kernels.cpu import NO_ROT


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

    def column_map(self) -> torch.Tensor:
        """int32 ``[H*D]``: column ``c`` of the normal part (``c >= 0``) or ``-c - 1`` of the special part."""
        cm = self.__dict__.get("_colmap")
        if cm is None:
            cm = self.__dict__["_colmap"] = _tables(self.shape[1] * self.shape[3], self.cols)[0]
        return cm

    def tile_into(self, t0: int, t1: int, out: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        if decode.meta_tile(self, t0, out, rot):  # both parts and RoPE in one compiled pass, no part tiles
            return out
        ops = cpu.on(out)
        if ops is None:
            self.tile_reference(t0, t1, out)
            return tiles.rotate_rows(out, rot)
        b, n = self.shape[0], t1 - t0
        parts = [p.tile_into(t0, t1, torch.empty(b, 1, n, p.shape[-1], device=out.device))
                 for p in (self.normal, self.special)]
        ops.split_tile(parts[0].view(b, n, -1), parts[1].view(b, n, -1), self.column_map(), out,
                       *(rot or (NO_ROT, NO_ROT)))
        return out

    def tile_reference(self, t0: int, t1: int, out: torch.Tensor) -> None:
        tiles.channel_split_reference(self, t0, t1, out)

    def decode_meta(self, keep: list[torch.Tensor]) -> list[int] | None:
        """How the compiled decode kernel reads this block (``kernels/cpu.py``), None if it cannot."""
        parts = [getattr(p, "decode_meta", lambda k: None)(keep) for p in (self.normal, self.special)]
        runs = self.__dict__.get("_colruns")
        if runs is None:
            runs = _tables(self.shape[1] * self.shape[3], self.cols)[1]
            runs = self.__dict__["_colruns"] = cpu.split_runs(self.column_map()) if runs is None else runs
        return cpu.split_meta(self.column_map(), runs, self.shape[1], self.shape[3], *parts)

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


def rest_columns(n: int, cols: torch.Tensor) -> torch.Tensor:
    """The ``n - len(cols)`` column indices not in ``cols`` (distinct, int64), ascending, on ``cols``' device,
    without a device-to-host sync (a boolean-mask index would need one on CUDA)."""
    keep = torch.ones(n, dtype=torch.uint8, device=cols.device)
    keep[cols] = 0
    return torch.argsort(keep, descending=True, stable=True)[: n - cols.numel()]


#: (columns, outlier columns) -> (column map, its runs) of CPU channel splits: a quantizer's outlier channels follow
#: its running statistics, so consecutive chunks mostly share them; the tables are read-only once built
_TABLES: dict[tuple[int, bytes], tuple[torch.Tensor, torch.Tensor | None]] = {}


def _tables(n: int, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ChannelSplit.column_map`` and its runs (``cpu.split_runs``, what the CPU decode kernel reads; None on other
    devices) for ``n`` flat columns with outliers ``cols``."""
    key = (n, cols.numpy().tobytes()) if cols.device.type == "cpu" else None
    hit = _TABLES.get(key) if key is not None else None
    if hit is not None:
        return hit
    c = cols.long()
    cm = torch.empty(n, dtype=torch.int32, device=c.device)
    cm[rest_columns(n, c)] = torch.arange(n - c.numel(), dtype=torch.int32, device=c.device)
    cm[c] = -1 - torch.arange(c.numel(), dtype=torch.int32, device=c.device)
    out = (cm, cpu.split_runs(cm) if key is not None else None)
    if key is not None:
        if len(_TABLES) >= 256:
            _TABLES.clear()
        _TABLES[key] = out
    return out

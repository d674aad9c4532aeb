"""Storage objects held by the compressed cache: every one knows its bytes and how to dequantize.

A stored tensor has the logical shape ``[B, H, T, D]`` (batch, KV heads un-repeated, tokens, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from kvcomp.kernels import cpu


@runtime_checkable
class Stored(Protocol):
    """A (possibly compressed) K or V block of logical shape ``[B, H, T, D]``."""

    @property
    def shape(self) -> tuple[int, int, int, int]: ...

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """Reconstruct ``[B, H, T, D]`` in ``dtype``."""
        ...

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this block holds (codes, scales, zero points, outliers, indices)."""
        ...

    @property
    def n_outliers(self) -> int:
        """Elements held at higher precision than the block's main width (sparse values, outlier channels)."""
        ...

    @property
    def width(self) -> int:
        """Bits per element of the block's main storage (16 for an uncompressed block)."""
        ...

    def tile_into(self, t0: int, t1: int, out: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        """Write tokens ``[t0, t1)`` as float32 into ``out`` ``[B, H, t1 - t0, D]`` (any strides, last dim
        contiguous), rotated by split-half RoPE ``rot`` = (cos, sin) ``[t1 - t0, D]`` when given: the compiled
        kernel when built, else ``tile_reference`` + the rotation. Returns ``out``."""
        ...

    def tile_reference(self, t0: int, t1: int, out: torch.Tensor) -> None:
        """Plain-torch tile (no rotation): the fallback and the oracle of ``tile_into``."""
        ...


def nbytes(block: Stored) -> int:
    """Bytes really held by ``block``: sum of ``nbytes`` of its tensors."""
    return sum(t.numel() * t.element_size() for t in block.tensors())


def numel(block: Stored) -> int:
    b, h, t, d = block.shape
    return b * h * t * d


@dataclass
class Dense:
    """Uncompressed block (full precision, or fp16 for sinks / warm-up chunks). ``data``: [B, H, T, D]."""

    data: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.data.to(dtype)

    def tile_into(self, t0: int, t1: int, out: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        return cpu.dense_tile(self.data, t0, t1, out, rot)

    def tile_reference(self, t0: int, t1: int, out: torch.Tensor) -> None:
        out.copy_(self.data[..., t0:t1, :])

    def decode_meta(self, keep: list[torch.Tensor]) -> list[int] | None:
        """How the compiled decode kernel reads this block (``kernels/cpu.py``), None if it cannot."""
        return cpu.dense_meta(self.data, keep)

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]

    def arena_key(self) -> tuple | None:
        """The layout a width arena (``arena.py``) shares: dtype and ``[B, H, *, D]``."""
        b, h, _, d = self.data.shape
        return "dense", self.data.dtype, b, h, d, self.data.device

    def arena_parts(self) -> list[torch.Tensor]:
        b, h, t, d = self.data.shape
        return [self.data.reshape(b * h, t, d)]

    def arena_view(self, bufs: list[torch.Tensor], n: int) -> Dense:
        b, h, _, d = self.data.shape
        return Dense(bufs[0].view(b, h, -1, d)[:, :, :n])

    @property
    def width(self) -> int:
        return 16

    @property
    def n_outliers(self) -> int:
        return 0


@dataclass
class Rows:
    """Rows ``rows`` (LongTensor [B']) of a block's batch: the prompt's block shared by beams / return sequences,
    reordered by beam search, without copying or requantizing it. Logical shape ``[B', H, T, D]``."""

    base: Stored
    rows: torch.Tensor

    @staticmethod
    def of(block: Stored, rows: torch.Tensor) -> Rows:
        return Rows(block.base, block.rows[rows]) if isinstance(block, Rows) else Rows(block, rows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        _, h, t, d = self.base.shape
        return int(self.rows.numel()), h, t, d

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.base.dequantize(dtype).index_select(0, self.rows)

    def _base_tile(self, t0: int, t1: int, out: torch.Tensor) -> torch.Tensor:
        _, h, _, d = self.base.shape
        return torch.empty(self.base.shape[0], h, t1 - t0, d, device=out.device)

    def tile_into(self, t0: int, t1: int, out: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        tile = self.base.tile_into(t0, t1, self._base_tile(t0, t1, out), rot)
        return out.copy_(tile.index_select(0, self.rows))

    def tile_reference(self, t0: int, t1: int, out: torch.Tensor) -> None:
        tile = self._base_tile(t0, t1, out)
        self.base.tile_reference(t0, t1, tile)
        out.copy_(tile.index_select(0, self.rows))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.base.tensors(), self.rows]

    @property
    def n_outliers(self) -> int:
        return self.base.n_outliers * int(self.rows.numel()) // max(1, self.base.shape[0])


@dataclass
class Segment:
    """What a quantizer returns for a run of tokens: K and V storage for the tokens ``index``.

    ``index``: LongTensor [T'] into the T input tokens (None = all of them, in order). Segments let one
    call store tokens at different widths (sinks at 8 bit, important tokens at 8, others at 2...).
    """

    keys: Stored
    values: Stored
    index: torch.Tensor | None = None

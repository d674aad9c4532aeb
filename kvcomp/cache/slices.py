"""The first ``n`` tokens of a width arena's bit-packed buffer, as a stored block (``arena.py``).

A width arena holds ``Packed`` codes, scales and zero points for ``capacity`` tokens (``full``: a ``Packed`` of
logical shape ``[B, H, capacity, D]``, so ``tiles.py``'s addressing with ``T = capacity`` finds every token) of
which the first ``n`` are stored. Reading a token range ``[t0, t1)`` with ``t1 <= n`` is reading ``full``; the
bytes counted are those of the first ``n`` token rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PackedSlice:
    """Tokens ``[0, n)`` of ``full`` (a token-axis ``Packed`` over a width arena's buffers)."""

    full: Any
    n: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, _, d = self.full.shape
        return b, h, self.n, d

    @property
    def bits(self) -> int:
        return self.full.bits

    @property
    def width(self) -> int:
        return self.full.bits

    @property
    def n_outliers(self) -> int:
        return 0

    def _rows(self) -> list[torch.Tensor]:
        return [p[:, : self.n] for p in self.full.arena_parts()]

    def tensors(self) -> list[torch.Tensor]:
        """The stored rows of codes, scales and zero points (views: their bytes are the first ``n`` tokens')."""
        return self._rows()

    def compact(self) -> Any:
        """The same tokens as a contiguous ``Packed`` of ``n`` tokens (bit-identical codes and statistics), cached."""
        c = self.__dict__.get("_compact")
        if c is None:
            c = self.full.arena_block([r.contiguous() for r in self._rows()], self.n)
            self.__dict__["_compact"] = c
        return c

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.compact().dequantize(dtype)

    def tile_into(self, t0: int, t1: int, out: torch.Tensor, rot: Any = None) -> torch.Tensor:
        return self.full.tile_into(t0, t1, out, rot)

    def tile_reference(self, t0: int, t1: int, out: torch.Tensor) -> None:
        self.full.tile_reference(t0, t1, out)

    def decode_meta(self, keep: list[torch.Tensor]) -> list[int] | None:
        return self.full.decode_meta(keep)

    def fused_parts(self, bits: tuple[int, ...]) -> Any:
        """(``full``, no outliers) for the Triton kernel (``kernels/plan.py``: layout ``T`` = the capacity, the
        first ``n`` tokens read)."""
        return self.full.fused_parts(bits)

    def arena_key(self) -> tuple | None:
        return self.full.arena_key()

    def arena_parts(self) -> list[torch.Tensor]:
        return self._rows()

    def arena_view(self, bufs: list[torch.Tensor], n: int) -> Any:
        return self.full.arena_view(bufs, n)

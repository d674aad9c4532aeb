"""Fewer, larger dequantize calls: consecutive whole blocks of one per-token layout read as one block.

A tile of history is a list of (block, t0, t1) pieces, one per stored block (a prefill chunk, a sink run,
a 32-token decode flush, a precision tier...). Per-token ``Packed`` blocks (``axis="token"``: scales and zero
points per token) of one layout (width, group, statistic dtypes, ``[B, H, ·, D]``) can be concatenated along
the tokens without changing any value: codes ``[B*H, T_i, bytes per token]`` and statistics
``[B, H, T_i, n_groups, 1]`` are joined (a copy of bytes, ~1/8 of the float tile at 4 bits), and the tile is
then dequantized by one call instead of one per block: the per-call overhead of a dozen small ops per block
is what dominates a decode step over many blocks.
"""

from __future__ import annotations

import torch

from kvcomp.cache.quant import Packed
from kvcomp.cache.storage import Stored

Piece = tuple[Stored, int, int]  # (block, first token, end token)


def _key(block: Stored, t0: int, t1: int) -> tuple | None:
    """Layout of a whole per-token ``Packed`` block whose rows are whole words, else None (not joinable)."""
    if type(block) is not Packed or block.axis != "token" or t0 != 0 or t1 != block.shape[2]:
        return None
    b, h, _, d = block.shape
    per = 8 if block.bits == 3 else 8 // block.bits
    if d % per:
        return None
    return block.bits, block.group, block.scale.dtype, block.zero.dtype, b, h, d, block.scale.shape[-2]


def join(blocks: list[Packed]) -> Packed:
    """One ``Packed`` holding the tokens of ``blocks`` (same ``_key``) in order."""
    first = blocks[0]
    b, h, _, d = first.shape
    ng = first.scale.shape[-2]
    t = sum(p.shape[2] for p in blocks)
    codes = torch.cat([p.codes.view(b * h, p.shape[2], -1) for p in blocks], dim=1).reshape(-1)
    scale = torch.cat([p.scale.view(b, h, p.shape[2], ng, 1) for p in blocks], dim=2)
    zero = torch.cat([p.zero.view(b, h, p.shape[2], ng, 1) for p in blocks], dim=2)
    return Packed(codes, scale, zero, first.bits, (b, h, t, d), "token", first.group)


def coalesce(pieces: list[Piece]) -> list[Piece]:
    """``pieces`` with every run of consecutive joinable blocks of one layout replaced by one joined block."""
    out: list[Piece] = []
    run: list[Packed] = []
    run_key: tuple | None = None

    def close() -> None:
        if len(run) == 1:
            out.append((run[0], 0, run[0].shape[2]))
        elif run:
            j = join(run)
            out.append((j, 0, j.shape[2]))
        run.clear()

    for block, t0, t1 in pieces:
        key = _key(block, t0, t1)
        if key is None or key != run_key:
            close()
        run_key = key
        if key is None:
            out.append((block, t0, t1))
        else:
            run.append(block)  # type: ignore[arg-type]
    close()
    return out

"""One layer's stored history: a few contiguous, append-only width arenas, plus pages.

A **width arena** holds every stored token of one storage layout (``arena_key`` of a block: fp16 / fp32 dense
rows, or bit-packed codes of one width with their per-token scales and zero points) in token-row buffers
``[B*H, capacity, -1]`` (``arena_parts``) grown by capacity doubling, and the tokens' int32 positions beside them.
K and V of a token live in one **slot** (a K arena, a V arena, the positions): appending a chunk copies its rows
after the last stored token, so a layer with int4 keys and values, fp16 sinks and 8/4/2-bit tiers has one slot
per (K layout, V layout) pair, not one block per chunk. What a layout cannot share (per-channel statistics of a
chunk, sparse outliers, channel splits, beam-shared rows, blocks a quantizer re-encodes later) is a **page**: a
slot holding that one block as it is.

Reading: ``segments()`` gives each slot as a (K block, V block, positions) triple, the arenas as views of their
first ``n`` tokens (``Dense`` over a slice, ``slices.PackedSlice``): every reader (tiles, the compiled decode
kernel, the oracle) reads one call per slot. A view never changes: later appends write past its ``n`` or into
grown buffers, so a forward's ``History`` stays what it found. Bytes: a view's ``tensors()`` are its ``n`` rows
(``kv_bytes``); the buffers' capacity is ``kv_bytes_reserved``.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcomp.cache.storage import Rows

Segment3 = tuple[Any, Any, torch.Tensor]


def arena_key(block: Any) -> tuple | None:
    """The block's shareable layout, or None (it is kept as a page)."""
    fn = getattr(block, "arena_key", None)
    return None if fn is None else fn()


class Rowbuf:
    """Token-row buffers ``[rows, capacity, -1]`` of one layout, the first ``n`` tokens stored."""

    def __init__(self, layout: Any) -> None:
        self.layout = layout  # a block (or view) of this layout: builds views over the buffers
        self.bufs: list[torch.Tensor] = []
        self.n = 0
        self.view: Any = None

    @property
    def capacity(self) -> int:
        return int(self.bufs[0].shape[1]) if self.bufs else 0

    def append(self, parts: list[torch.Tensor]) -> None:
        m = int(parts[0].shape[1])
        if self.n + m > self.capacity:
            cap = max(self.n + m, 2 * self.capacity)
            new = [p.new_empty(p.shape[0], cap, *p.shape[2:]) for p in parts]
            for a, b in zip(new, self.bufs, strict=False):
                a[:, : self.n].copy_(b[:, : self.n])
            self.bufs = new
        for buf, p in zip(self.bufs, parts, strict=True):
            buf[:, self.n : self.n + m].copy_(p)
        self.n += m
        self.view = self.layout.arena_view(self.bufs, self.n)
        self.layout = self.view  # holds the current buffers only


class Slot:
    """K and V of some tokens with their int32 positions: width arenas (``bufs``) or one ``page`` as stored."""

    def __init__(self, page: Segment3 | None = None, k: Any = None, v: Any = None) -> None:
        self.page = page
        self.bufs = None if page is not None else (Rowbuf(k), Rowbuf(v))
        self.pos = torch.zeros(0, dtype=torch.int32)
        self.n = 0

    def append(self, k: Any, v: Any, pos: torch.Tensor) -> None:
        assert self.bufs is not None
        self.bufs[0].append(k.arena_parts())
        self.bufs[1].append(v.arena_parts())
        m = int(pos.numel())
        if self.n + m > self.pos.numel():
            grown = torch.empty(max(self.n + m, 2 * int(self.pos.numel())), dtype=torch.int32, device=pos.device)
            grown[: self.n] = self.pos[: self.n]
            self.pos = grown
        self.pos[self.n : self.n + m] = pos
        self.n += m

    def segment(self) -> Segment3:
        if self.page is not None:
            return self.page
        assert self.bufs is not None
        return self.bufs[0].view, self.bufs[1].view, self.pos[: self.n]


class Arena:
    """A layer's stored (K, V, positions): its slots, in the order ``segments()`` and ``materialize`` read them."""

    def __init__(self) -> None:
        self.slots: list[Slot] = []
        self.open: dict[tuple, Slot] = {}  # (K layout, V layout) -> the slot appends of that layout go to
        #: bumped at the end of every change of the stored segments (append, replace, select_rows; a rewrite builds
        #: a new arena): what readers derived from ``segments()`` is valid while it stays
        self.version = 0
        #: (version, the decode kernel's plan of ``segments()`` at that version), or None (``kernels/decode.py``)
        self.plan: tuple[int, Any] | None = None
        self._segments: list[Segment3] | None = None  # ``segments()`` at this version

    def _changed(self) -> None:
        self.version += 1
        self.plan = self._segments = None

    def append(self, k: Any, v: Any, pos: torch.Tensor) -> None:
        """Store K/V blocks ``[B, H, m, D]`` of ``m`` tokens at ``pos``: into their layout's arenas, or as a page."""
        key = (arena_key(k), arena_key(v))
        if key[0] is None or key[1] is None:
            self.slots.append(Slot(page=(k, v, pos)))
        else:
            slot = self.open.get(key)
            if slot is None:
                slot = self.open[key] = Slot(k=k, v=v)
                self.slots.append(slot)
            slot.append(k, v, pos.to(torch.int32))
        self._changed()

    def segments(self) -> list[Segment3]:
        if self._segments is None:
            self._segments = [s.segment() for s in self.slots]
        return list(self._segments)

    def held(self) -> int:
        return sum(int(p.numel()) for _, _, p in self.segments())

    def replace(self, i: int, k: Any, v: Any) -> None:
        """Slot ``i``'s tokens re-stored as the blocks ``k``/``v`` (same tokens, same order): a page."""
        pos = self.slots[i].segment()[2]
        self.open = {key: s for key, s in self.open.items() if s is not self.slots[i]}
        self.slots[i] = Slot(page=(k, v, pos))
        self._changed()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Batch row ``i`` becomes old row ``rows[i]``: every slot becomes a page of shared rows (``Rows``, no copy);
        later tokens (of the new batch) open new arenas."""
        self.slots = [Slot(page=(Rows.of(k, rows), Rows.of(v, rows), pos)) for k, v, pos in self.segments()]
        self.open = {}
        self._changed()

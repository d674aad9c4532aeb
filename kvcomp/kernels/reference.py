"""Reference decode attention over a compressed layer, reading the packed blocks tile by tile.

For one query step ``q`` ``[B, Hq, 1, D]`` and a ``CompressedLayer`` holding ``N`` tokens (packed blocks,
then the full-precision residual, then optionally this step's own ``new_k``/``new_v``)::

    out[b, j] = softmax_t(q[b, j] . k[b, j // G, t] * scale) @ v[b, j // G]      (G = Hq / Hkv)

with ``k`` post-RoPE (keys stored pre-RoPE are rotated at their absolute positions, as
``CompressedLayer.materialize`` does). GQA without repeating K/V: the G query heads of a KV head are
the rows of one ``[G, D] x [D, n]`` product. Blocks are dequantized ``tile`` tokens at a time into one
reused float32 workspace and folded into a running (max, sum, accumulator) online softmax, so memory
stays ``O(B * Hkv * tile * D)`` whatever ``N`` is. Everything is float32; the result is cast to
``query.dtype``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.kernels.chunk import Residual
from kvcomp.kernels.rotary import rotate

#: (k block, v block, int32 positions [T] or None = do not rotate)
Segment = tuple[Any, Any, "torch.Tensor | None"]


@dataclass
class Softmax:
    """Running online-softmax state per (batch, KV head, query head in the group), float32.

    ``m`` ``[B, Hkv, G]``: running max of the scaled scores; ``l``: sum of ``exp(score - m)``;
    ``acc`` ``[B, Hkv, G, D]``: sum of ``exp(score - m) * v``.
    """

    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor

    @classmethod
    def empty(cls, b: int, hkv: int, g: int, d: int, device: torch.device) -> Softmax:
        m = torch.full((b, hkv, g), float("-inf"), device=device)
        return cls(m, torch.zeros(b, hkv, g, device=device), torch.zeros(b, hkv, g, d, device=device))

    def merge(self, m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> None:
        """Fold in a partial ``(m, l, acc)`` of the same shapes (``m = -inf`` where it saw no token)."""
        new = torch.maximum(self.m, m)
        safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
        a, b = torch.exp(self.m - safe), torch.exp(m - safe)
        self.l = self.l * a + l * b
        self.acc = self.acc * a[..., None] + acc * b[..., None]
        self.m = new

    def add_scores(self, s: torch.Tensor, v: torch.Tensor) -> None:
        """Fold in scaled scores ``s`` ``[B, Hkv, G, n]`` of ``n`` tokens with values ``v`` ``[B, Hkv, n, D]``."""
        m = s.amax(dim=-1)
        p = torch.exp(s - m[..., None])
        self.merge(m, p.sum(dim=-1), torch.matmul(p, v))

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """``acc / l`` as ``[B, Hkv * G, 1, D]`` in ``dtype``."""
        b, hkv, g, d = self.acc.shape
        return (self.acc / self.l[..., None]).reshape(b, hkv * g, 1, d).to(dtype)


def segments(layer: Any, new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None
             ) -> Iterator[Segment]:
    """The layer's blocks in ``materialize`` order: packed segments, residual, then ``new_k``/``new_v``
    (post-RoPE, never rotated). Positions are None when the layer stores post-RoPE keys."""
    rot = layer.rope is not None
    for kb, vb, pos in zip(layer.k_blocks, layer.v_blocks, layer.pos_blocks, strict=True):
        yield kb, vb, pos if rot else None
    if layer.res_k is not None:
        yield Residual(layer.res_k), Residual(layer.res_v), layer.res_pos if rot else None
    if new_k is not None:
        yield Residual(new_k), Residual(new_v), None


def rope_cos_sin(rope: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[n, D]`` float32 for ``positions`` [n], computed like ``Rope.cos_sin`` (same model
    module, so bit-identical per position) but not memoised: tiles must not evict the model's memo."""
    dummy = torch.empty(0, dtype=torch.float32, device=positions.device)
    cos, sin = rope.rotary(dummy, positions.long().unsqueeze(0))
    return cos[0].float(), sin[0].float()


def attend_segment(state: Softmax, q: torch.Tensor, seg: Segment, rope: Any, tile: int,
                   ws: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Fold one segment into ``state``. ``q``: scaled float32 ``[B, Hkv, G, D]``; ``ws``: two flat float32
    workspaces of at least ``B * Hkv * tile * D`` elements, reused for K and V tiles."""
    kb, vb, pos = seg
    b, h, t, d = kb.shape
    for t0 in range(0, t, tile):
        t1 = min(t, t0 + tile)
        n = (t1 - t0) * b * h * d
        k = ws[0][:n].view(b, h, t1 - t0, d)
        kb.tile_reference(t0, t1, k)
        if pos is not None:
            cos, sin = rope_cos_sin(rope, pos[t0:t1])
            k = rotate(k, cos, sin)
        v = ws[1][:n].view(b, h, t1 - t0, d)
        vb.tile_reference(t0, t1, v)
        state.add_scores(torch.matmul(q, k.transpose(-1, -2)), v)


def split_query(query: torch.Tensor, hkv: int, scale: float | None) -> torch.Tensor:
    """``query`` ``[B, Hq, 1, D]`` -> scaled float32 ``[B, Hkv, G, D]`` (query head ``j`` -> KV head ``j // G``)."""
    b, hq, q_len, d = query.shape
    if q_len != 1:
        raise ValueError(f"decode attention takes one query step, got query of shape {tuple(query.shape)}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    s = d ** -0.5 if scale is None else scale
    return query.float().reshape(b, hkv, hq // hkv, d) * s


def kv_heads(layer: Any, new_k: torch.Tensor | None) -> int:
    """Number of KV heads the layer stores (or ``new_k`` has); ValueError when there is nothing to attend to."""
    for blk in [*layer.k_blocks, layer.res_k, new_k]:
        if blk is not None:
            return int(blk.shape[1])
    raise ValueError("decode attention over an empty layer without new_k/new_v")


@torch.no_grad()
def decode_attention_reference(query: torch.Tensor, layer: Any, new_k: torch.Tensor | None = None,
                               new_v: torch.Tensor | None = None, scale: float | None = None,
                               tile: int = 256) -> torch.Tensor:
    """``softmax(q K^T * scale) V`` for one query step over everything ``layer`` holds (+ ``new_k``/``new_v``).

    ``query`` ``[B, Hq, 1, D]``; ``new_k``/``new_v`` ``[B, Hkv, q, D]`` post-RoPE or None; ``scale``
    defaults to ``D ** -0.5``; ``tile``: tokens dequantized at a time. Returns ``[B, Hq, 1, D]`` in
    ``query.dtype``. Equals ``layer.materialize(new_k, new_v)`` + SDPA with repeated KV heads up to
    float32 rounding (when the layer dtype is float32).
    """
    hkv = kv_heads(layer, new_k)
    q = split_query(query, hkv, scale)
    b, _, g, d = q.shape
    state = Softmax.empty(b, hkv, g, d, query.device)
    ws = (torch.empty(b * hkv * tile * d, device=query.device), torch.empty(b * hkv * tile * d, device=query.device))
    for seg in segments(layer, new_k, new_v):
        attend_segment(state, q, seg, layer.rope, tile, ws)
    return state.result(query.dtype)

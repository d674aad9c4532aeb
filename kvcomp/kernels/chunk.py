"""Attention of a chunk of queries straight from a compressed layer's packed history, tile by tile.

For queries ``q`` ``[B, Hq, n, D]`` (post-RoPE), a layer's history as it was before this forward (packed
blocks, fp16 blocks, the full-precision residual; ``History``) and the forward's own post-RoPE K/V
``[B, Hkv, n, D]``::

    out = softmax([q·K_hist^T | q·K_new^T + causal] * scale) @ [V_hist | V_new]

computed without ever building ``K_hist``: each history tile is dequantized into a reused float32
workspace (RoPE re-applied at its stored positions from a cached table), attended with no mask, and
folded into a running (output, log-sum-exp) pair; the forward's own K/V are attended causally last.
GQA: ``Hq`` query heads on ``Hkv`` KV heads, never repeated. On CPU each tile goes through ATen's fused
flash kernel (``_scaled_dot_product_flash_attention_for_cpu``: output + log-sum-exp, GQA-aware); elsewhere
a float32 matmul fallback computes the same pair. Returns the output and the log-sum-exp of every
query (the scorers read attention weights from it without a second pass over the history). Profiler
scopes ``kvcomp::dequantize`` / ``kvcomp::rope`` / ``kvcomp::attend`` name where the time goes.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function

from kvcomp.kernels import cpu

#: CPU tiles through ATen's fused flash kernel (its exp is a fast approximation, ~1e-6 relative); False = exact
#: float32 matmul + softmax, as the oracle computes
FUSED_CPU = True
#: most history tokens dequantized into the workspace at once (blocks shorter than this share a tile)
TILE = 4096


@dataclass
class Residual:
    """A layer's full-precision residual ``data`` ``[B, H, R, D]`` as a stored block (``tile_into``)."""

    data: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    def tile_into(self, t0: int, t1: int, out: torch.Tensor, rot: Any = None) -> torch.Tensor:
        return cpu.dense_tile(self.data, t0, t1, out, rot)

    def tile_reference(self, t0: int, t1: int, out: torch.Tensor) -> None:
        out.copy_(self.data[..., t0:t1, :])

    def decode_meta(self, keep: list[torch.Tensor]) -> list[int] | None:
        return cpu.dense_meta(self.data, keep)


@dataclass
class History:
    """A layer's history at the start of a forward: stored blocks, their int32 positions, the residual.

    Lists are copies and tensors are never written in place by the layer, so storing this forward's tokens
    (which may flush the residual into new blocks) leaves the view unchanged."""

    k_blocks: list[Any]
    v_blocks: list[Any]
    pos_blocks: list[torch.Tensor]
    res_k: torch.Tensor | None
    res_v: torch.Tensor | None
    res_pos: torch.Tensor | None
    #: the store the stored segments came from (duck-typed: ``version``, ``plan``) and its version then: a decode
    #: kernel's plan of these segments is kept on the store while its version stays (``decode.layer_plan``)
    store: Any = None
    version: int = -1

    def segments(self) -> list[tuple[Any, Any, torch.Tensor]]:
        segs = list(zip(self.k_blocks, self.v_blocks, self.pos_blocks, strict=True))
        if self.res_k is not None:
            segs.append((Residual(self.res_k), Residual(self.res_v), self.res_pos))
        return segs

    def __len__(self) -> int:
        n = sum(int(p.numel()) for p in self.pos_blocks)
        return n + (0 if self.res_pos is None else int(self.res_pos.numel()))


def attend_pair(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``[B, Hq, n, D]`` fp32, lse ``[B, Hq, n]`` fp32) of ``q`` over ``k``/``v`` ``[B, Hkv, m, D]``;
    ``causal``: query ``i`` sees keys ``j <= i`` (n == m)."""
    if q.device.type == "cpu" and FUSED_CPU:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
        return out, lse
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    qg = q.float().reshape(b, hkv, hq // hkv, n, d)
    s = torch.matmul(qg, k.float().transpose(-1, -2).unsqueeze(2)) * scale  # [B, Hkv, G, n, m]
    if causal:
        s.masked_fill_(torch.ones(n, m, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.matmul(p, v.float().unsqueeze(2))
    return out.reshape(b, hq, n, d), lse.reshape(b, hq, n)


class Merge:
    """Running (output, log-sum-exp) over tiles: ``out = sum_i exp(lse_i - lse) out_i``."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out, lse
            return
        new = torch.logaddexp(self.lse, lse)
        a, b = torch.exp(self.lse - new).unsqueeze(-1), torch.exp(lse - new).unsqueeze(-1)
        self.out = self.out.mul_(a).addcmul_(out, b)  # in place: ``out`` of a first tile is this pass's own
        self.lse = new


def dequantize_tile(block: Any, t0: int, t1: int, out: torch.Tensor, rot: Any = None) -> torch.Tensor:
    """Write tokens ``[t0, t1)`` of a stored ``block`` into ``out`` float32 ``[B, H, t1 - t0, D]`` (a workspace
    slot: any strides with a contiguous last dim), rotated by ``rot`` = (cos, sin) when given: the block's own
    ``tile_into`` (compiled kernel, or its plain-torch tile). Returns ``out``."""
    return block.tile_into(t0, t1, out, rot)


def scope(name: str) -> Any:
    """A named profiler range while torch.profiler records (``benchmarks.prefill``'s breakdown), else nothing:
    ranges cost a dispatcher call each, and a decode step opens dozens per layer."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else nullcontext()


def rotate_into(rope: Any, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The model's RoPE of float32 ``x`` ``[B, H, n, D]`` at ``positions`` written into ``out`` (a workspace slot):
    cos/sin from the rope's cached table; the plain LLaMA rotation in place, any other one through the model's
    own function (``Rope.rotate``)."""
    cos, sin = rope.lookup(positions)
    d = x.shape[-1]
    if not rope.split_half(d):
        return out.copy_(rope.rotate(x, cos, sin))
    h = d // 2
    x1, x2 = x[..., :h], x[..., h:]
    torch.mul(x1, cos[:, :h], out=out[..., :h]).addcmul_(x2, sin[:, :h], value=-1)
    torch.mul(x2, cos[:, h:], out=out[..., h:]).addcmul_(x1, sin[:, h:])
    return out


def tiles(history: History, cap: int) -> list[list[tuple[Any, Any, torch.Tensor, int, int]]]:
    """The history cut into tiles of at most ``cap`` tokens, each a list of (k block, v block, positions, t0, t1)
    pieces: small blocks share a tile (fewer kernel calls and merges), long blocks are split."""
    out: list[list[tuple[Any, Any, torch.Tensor, int, int]]] = [[]]
    room = cap
    for kb, vb, pos in history.segments():
        t, t0 = int(pos.numel()), 0
        while t0 < t:
            if room == 0:
                out.append([])
                room = cap
            t1 = min(t, t0 + room)
            out[-1].append((kb, vb, pos, t0, t1))
            room -= t1 - t0
            t0 = t1
    return out if out[0] else []


@torch.no_grad()
def chunk_attention(query: torch.Tensor, history: History, new_k: torch.Tensor, new_v: torch.Tensor,
                    scale: float, rope: Any, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[B, Hq, n, D]`` over ``history`` then ``new_k``/``new_v`` ``[B, Hkv, n, D]``
    (causal). ``rope``: re-applies RoPE to stored (pre-RoPE) keys, None when keys are stored post-RoPE.
    ``tile``: most history tokens dequantized at once. Returns (out ``[B, Hq, n, D]`` in ``query.dtype``,
    lse ``[B, Hq, n]`` float32)."""
    q = query.float()
    b, hkv, _, d = new_k.shape
    merge = Merge()
    plan = tiles(history, tile)
    fused = rope is None or rope.split_half(d)  # rotation applied by the tile writers in the same pass
    if plan:
        cap = max(sum(t1 - t0 for *_, t0, t1 in pieces) for pieces in plan)
        ws = torch.empty(2 if fused else 3, b * hkv * cap * d, device=q.device)
        for pieces in plan:
            m = sum(t1 - t0 for *_, t0, t1 in pieces)
            k, v, raw = (ws[i, : b * hkv * m * d].view(b, hkv, m, d) for i in (0, 1, -1))
            dest = k if fused else raw  # another RoPE: dequantized here, rotated once per tile below
            cos = sin = None
            if rope is not None:
                with scope("kvcomp::rope"):
                    pos = [p[t0:t1] for _, _, p, t0, t1 in pieces]
                    pos = pos[0] if len(pos) == 1 else torch.cat(pos)
                    if fused:
                        cos, sin = rope.lookup(pos)
            o = 0
            with scope("kvcomp::dequantize"):
                for kb, vb, _, t0, t1 in pieces:
                    n = t1 - t0
                    rot = None if cos is None else (cos[o : o + n], sin[o : o + n])
                    dequantize_tile(kb, t0, t1, dest[:, :, o : o + n], rot)
                    dequantize_tile(vb, t0, t1, v[:, :, o : o + n])
                    o += n
            if not fused:
                with scope("kvcomp::rope"):
                    rotate_into(rope, raw, pos, k)
            with scope("kvcomp::attend"):
                merge.add(*attend_pair(q, k, v, scale, causal=False))
    with scope("kvcomp::attend"):
        merge.add(*attend_pair(q, new_k.float(), new_v.float(), scale, causal=True))
    assert merge.out is not None and merge.lse is not None
    return merge.out.to(query.dtype), merge.lse

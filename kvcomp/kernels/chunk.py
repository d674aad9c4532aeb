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

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function

from kvcomp.cache.quant import ChannelSplit, Packed, Sparse, column_runs
from kvcomp.cache.rope import Rope
from kvcomp.cache.storage import Dense, Stored
from kvcomp.kernels.tiles import dequantize_tokens, outliers_in

#: CPU tiles through ATen's fused flash kernel (its exp is a fast approximation, ~1e-6 relative); False = exact
#: float32 matmul + softmax, as the oracle computes
FUSED_CPU = True
#: most history tokens dequantized into the workspace at once (blocks shorter than this share a tile)
TILE = 4096


@dataclass
class History:
    """A layer's history at the start of a forward: stored blocks, their int32 positions, the residual.

    Lists are copies and tensors are never written in place by the layer, so storing this forward's tokens
    (which may flush the residual into new blocks) leaves the view unchanged."""

    k_blocks: list[Stored]
    v_blocks: list[Stored]
    pos_blocks: list[torch.Tensor]
    res_k: torch.Tensor | None
    res_v: torch.Tensor | None
    res_pos: torch.Tensor | None

    def segments(self) -> list[tuple[Stored, Stored, torch.Tensor]]:
        segs = list(zip(self.k_blocks, self.v_blocks, self.pos_blocks, strict=True))
        if self.res_k is not None:
            segs.append((Dense(self.res_k), Dense(self.res_v), self.res_pos))
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


def dequantize_tile(block: Stored, t0: int, t1: int, out: torch.Tensor) -> torch.Tensor:
    """Write tokens ``[t0, t1)`` of ``block`` into ``out`` float32 ``[B, H, t1 - t0, D]`` (a workspace slot:
    any strides with a contiguous last dim) and return it. Packed codes are sliced per row, not gathered."""
    if isinstance(block, Dense):
        out.copy_(block.data[..., t0:t1, :])
    elif isinstance(block, Packed) and _sliceable(block):
        _packed_tile(block, t0, t1, out)
    elif isinstance(block, Sparse):
        dequantize_tile(block.base, t0, t1, out)
        idx, local = outliers_in(block.index, block.shape, t0, t1)
        if idx.numel():
            b, h, n, d = out.shape
            bh, rem = local // (n * d), local % (n * d)
            out[bh // h, bh % h, rem // d, rem % d] = block.values[idx].float()
    elif isinstance(block, ChannelSplit):
        _channel_split_tile(block, t0, t1, out)
    elif out.is_contiguous():
        dequantize_tokens(block, t0, t1, out)
    else:
        out.copy_(dequantize_tokens(block, t0, t1))
    return out


def scope(name: str) -> Any:
    """A named profiler range while torch.profiler records (``benchmarks.prefill``'s breakdown), else nothing:
    ranges cost a dispatcher call each, and a decode step opens dozens per layer."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else nullcontext()


def _per(bits: int) -> int:
    return 8 if bits == 3 else 8 // bits


def _sliceable(p: Packed) -> bool:
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


def _codes(p: Packed, t0: int, t1: int) -> torch.Tensor:
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


def _packed_tile(p: Packed, t0: int, t1: int, out: torch.Tensor) -> None:
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


def _channel_split_tile(c: ChannelSplit, t0: int, t1: int, out: torch.Tensor) -> None:
    """Both parts dequantized into contiguous buffers, then copied into ``out`` by column runs (``_runs``): a few
    slice copies instead of a gather or scatter along the last dim (slow on CPU)."""
    b = c.shape[0]
    n = t1 - t0
    parts = [dequantize_tile(p, t0, t1, torch.empty(b, 1, n, p.shape[-1], device=out.device))
             for p in (c.normal, c.special)]
    for part, h, d0, d1, s0 in _runs(c):
        out[:, h, :, d0:d1].copy_(parts[part][:, 0, :, s0 : s0 + d1 - d0])


def _runs(c: ChannelSplit) -> list[tuple[int, int, int, int, int]]:
    """``column_runs`` of a block, computed once per block."""
    runs = getattr(c, "_runs", None)
    if runs is None:
        runs = column_runs(c.shape[1], c.shape[3], c.cols)
        object.__setattr__(c, "_runs", runs)
    return runs


def rotate_into(rope: Rope, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
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


def tiles(history: History, cap: int) -> list[list[tuple[Stored, Stored, torch.Tensor, int, int]]]:
    """The history cut into tiles of at most ``cap`` tokens, each a list of (k block, v block, positions, t0, t1)
    pieces: small blocks share a tile (fewer kernel calls and merges), long blocks are split."""
    out: list[list[tuple[Stored, Stored, torch.Tensor, int, int]]] = [[]]
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
                    scale: float, rope: Rope | None, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[B, Hq, n, D]`` over ``history`` then ``new_k``/``new_v`` ``[B, Hkv, n, D]``
    (causal). ``rope``: re-applies RoPE to stored (pre-RoPE) keys, None when keys are stored post-RoPE.
    ``tile``: most history tokens dequantized at once. Returns (out ``[B, Hq, n, D]`` in ``query.dtype``,
    lse ``[B, Hq, n]`` float32)."""
    q = query.float()
    b, hkv, _, d = new_k.shape
    merge = Merge()
    plan = tiles(history, tile)
    if plan:
        cap = max(sum(t1 - t0 for *_, t0, t1 in pieces) for pieces in plan)
        ws = torch.empty(2 if rope is None else 3, b * hkv * cap * d, device=q.device)
        for pieces in plan:
            m = sum(t1 - t0 for *_, t0, t1 in pieces)
            k, v, raw = (ws[i, : b * hkv * m * d].view(b, hkv, m, d) for i in (0, 1, -1))
            dest = k if rope is None else raw  # pre-RoPE keys: dequantized here, rotated once per tile below
            o = 0
            with scope("kvcomp::dequantize"):
                for kb, vb, _, t0, t1 in pieces:
                    n = t1 - t0
                    dequantize_tile(kb, t0, t1, dest[:, :, o : o + n])
                    dequantize_tile(vb, t0, t1, v[:, :, o : o + n])
                    o += n
            if rope is not None:
                with scope("kvcomp::rope"):
                    pos = [p[t0:t1] for _, _, p, t0, t1 in pieces]
                    rotate_into(rope, raw, pos[0] if len(pos) == 1 else torch.cat(pos), k)
            with scope("kvcomp::attend"):
                merge.add(*attend_pair(q, k, v, scale, causal=False))
    with scope("kvcomp::attend"):
        merge.add(*attend_pair(q, new_k.float(), new_v.float(), scale, causal=True))
    assert merge.out is not None and merge.lse is not None
    return merge.out.to(query.dtype), merge.lse

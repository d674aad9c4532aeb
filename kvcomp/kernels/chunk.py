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
query (the scorers read attention weights from it without a second pass over the history).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.cache.quant import ChannelSplit, Packed, Sparse
from kvcomp.cache.rope import rotate_half
from kvcomp.cache.storage import Dense, Stored
from kvcomp.kernels.tiles import dequantize_tokens, outliers_in

#: CPU tiles through ATen's fused flash kernel (its exp is a fast approximation, ~1e-6 relative); False = exact
#: float32 matmul + softmax, as the oracle computes
FUSED_CPU = True
#: largest history tile (tokens) dequantized at once; blocks are at most a prefill chunk long
TILE = 1024


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
        self.out = self.out * a + out * b
        self.lse = new


def dequantize_tile(block: Stored, t0: int, t1: int, out: torch.Tensor) -> torch.Tensor:
    """Tokens ``[t0, t1)`` of ``block`` as float32 ``[B, H, t1 - t0, D]`` (in ``out`` unless the block is a
    float32 ``Dense`` one, returned as a view). Packed codes are sliced per row, not gathered."""
    if isinstance(block, Dense):
        x = block.data[..., t0:t1, :]
        if x.dtype == torch.float32:
            return x
        out.copy_(x)
        return out
    if isinstance(block, Packed) and _sliceable(block):
        _packed_tile(block, t0, t1, out)
        return out
    if isinstance(block, Sparse):
        dequantize_tile(block.base, t0, t1, out)
        idx, local = outliers_in(block.index, block.shape, t0, t1)
        if idx.numel():
            out.view(-1)[local] = block.values[idx].float()
        return out
    if isinstance(block, ChannelSplit):
        _channel_split_tile(block, t0, t1, out)
        return out
    return dequantize_tokens(block, t0, t1, out)


def _sliceable(p: Packed) -> bool:
    d = p.shape[-1]
    per = 8 if p.bits == 3 else 8 // p.bits
    return d % per == 0 and (p.axis == "channel" or d % p.group == 0)


_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    key = (bits, device)
    if key not in _SHIFTS:
        per = 8 if bits == 3 else 8 // bits
        _SHIFTS[key] = torch.arange(per, dtype=torch.int32, device=device) * bits
    return _SHIFTS[key]


def _packed_tile(p: Packed, t0: int, t1: int, out: torch.Tensor) -> None:
    b, h, t, d = p.shape
    bh, n = b * h, t1 - t0
    if p.bits == 8:
        code = p.codes.view(bh, t, d)[:, t0:t1]
    elif p.bits == 3:
        c = p.codes.view(bh, t, d // 8, 3)[:, t0:t1].int()
        word = c[..., 0] | (c[..., 1] << 8) | (c[..., 2] << 16)
        code = ((word.unsqueeze(-1) >> _shifts(3, c.device)) & 7).view(bh, n, d)
    else:
        per = 8 // p.bits
        c = p.codes.view(bh, t, d // per)[:, t0:t1].int()
        code = ((c.unsqueeze(-1) >> _shifts(p.bits, c.device)) & ((1 << p.bits) - 1)).view(bh, n, d)
    o = out.view(bh, n, d)
    if p.axis == "token":
        ng = p.scale.shape[-2]
        scale = p.scale.view(bh, t, ng, 1)[:, t0:t1].float()
        zero = p.zero.view(bh, t, ng, 1)[:, t0:t1].float()
        ov = o.view(bh, n, ng, d // ng)
        torch.mul(code.view(bh, n, ng, d // ng), scale, out=ov)
        ov.add_(zero)
        return
    ng = p.scale.shape[-2]
    gi = torch.arange(t0, t1, device=p.codes.device) // p.group
    scale = p.scale.view(bh, d, ng).index_select(-1, gi).float().transpose(-1, -2)  # [BH, n, D]
    zero = p.zero.view(bh, d, ng).index_select(-1, gi).float().transpose(-1, -2)
    torch.mul(code, scale, out=o)
    o.add_(zero)


def _channel_split_tile(c: ChannelSplit, t0: int, t1: int, out: torch.Tensor) -> None:
    b, h, _, d = c.shape
    n = t1 - t0
    cols = c.cols.long()
    rest = _rest(c, h * d)
    normal = dequantize_tile(c.normal, t0, t1, torch.empty(b, 1, n, h * d - cols.numel(), device=out.device))
    special = dequantize_tile(c.special, t0, t1, torch.empty(b, 1, n, cols.numel(), device=out.device))
    flat = torch.empty(b, n, h * d, device=out.device)
    flat.index_copy_(-1, rest, normal.reshape(b, n, -1))
    flat.index_copy_(-1, cols, special.reshape(b, n, -1))
    out.copy_(flat.view(b, n, h, d).transpose(1, 2))


def _rest(c: ChannelSplit, n: int) -> torch.Tensor:
    """Columns of the ``normal`` part, computed once per block."""
    rest = getattr(c, "_rest_cols", None)
    if rest is None:
        keep = torch.ones(n, dtype=torch.bool, device=c.cols.device)
        keep[c.cols.long()] = False
        rest = keep.nonzero().squeeze(1)
        object.__setattr__(c, "_rest_cols", rest)
    return rest


class RopeTable:
    """cos/sin ``[P, D]`` float32 for positions ``0..P-1`` from the model's rotary module, grown on demand;
    a tile's rows are an ``index_select`` (no trigonometry per tile, per layer or per step)."""

    def __init__(self, rotary: Any) -> None:
        self.rotary = rotary
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = int(positions.max()) + 1 if positions.numel() else 0
        if self.cos is None or self.cos.shape[0] < top or self.cos.device != positions.device:
            size = max(top, 2 * (0 if self.cos is None else self.cos.shape[0]), 1024)
            dummy = torch.empty(0, dtype=torch.float32, device=positions.device)
            cos, sin = self.rotary(dummy, torch.arange(size, device=positions.device).unsqueeze(0))
            self.cos, self.sin = cos[0].float(), sin[0].float()
        idx = positions.long()
        return self.cos.index_select(0, idx), self.sin.index_select(0, idx)

    def apply_(self, x: torch.Tensor, positions: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        """Rotate float32 ``x`` ``[B, H, n, D]`` to its positions: ``x*cos + rotate_half(x)*sin``, into ``tmp``."""
        cos, sin = self.lookup(positions)
        half = x.shape[-1] // 2
        torch.mul(x, cos, out=tmp)
        rot = torch.empty_like(x)
        torch.mul(x[..., half:], sin[:, :half], out=rot[..., :half]).neg_()
        torch.mul(x[..., :half], sin[:, half:], out=rot[..., half:])
        return tmp.add_(rot)


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


@torch.no_grad()
def chunk_attention(query: torch.Tensor, history: History, new_k: torch.Tensor, new_v: torch.Tensor,
                    scale: float, rope: RopeTable | None, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[B, Hq, n, D]`` over ``history`` then ``new_k``/``new_v`` ``[B, Hkv, n, D]``
    (causal). ``rope``: re-applies RoPE to stored (pre-RoPE) keys, None when keys are stored post-RoPE.
    Returns (out ``[B, Hq, n, D]`` in ``query.dtype``, lse ``[B, Hq, n]`` float32)."""
    q = query.float()
    b, hkv, _, d = new_k.shape
    merge = Merge()
    segs = history.segments()
    if segs:
        longest = min(tile, max(int(p.numel()) for _, _, p in segs))
        ws = torch.empty(3, b * hkv * longest * d, device=q.device)
        for kb, vb, pos in segs:
            t = int(pos.numel())
            for t0 in range(0, t, tile):
                t1 = min(t, t0 + tile)
                m = b * hkv * (t1 - t0) * d
                k = dequantize_tile(kb, t0, t1, ws[0, :m].view(b, hkv, t1 - t0, d))
                if rope is not None:
                    k = rope.apply_(k, pos[t0:t1], ws[2, :m].view(b, hkv, t1 - t0, d))
                v = dequantize_tile(vb, t0, t1, ws[1, :m].view(b, hkv, t1 - t0, d))
                merge.add(*attend_pair(q, k, v, scale, causal=False))
    merge.add(*attend_pair(q, new_k.float(), new_v.float(), scale, causal=True))
    assert merge.out is not None and merge.lse is not None
    return merge.out.to(query.dtype), merge.lse

"""Fused Triton decode attention over the packed blocks of a ``CompressedLayer`` (GQA, flash-decoding).

Fused in the kernel, per program = (batch x KV head, run of ``split`` tokens of one block, tile of query rows):

- loading the packed 2/4/8-bit codes of K and V and unpacking them (addressing in ``tiles.py``);
- dequantization with fp16 (or fp32) scale and zero point per channel (``axis="channel"``, optionally in
  groups of tokens) or per token / group of channels (``axis="token"``), for K and V independently;
- sparse outliers (``Sparse`` blocks of livekvquant): each tile's outliers (sorted int32 flat indices,
  fp16 values) are read and applied: to K as a score correction ``q . rot(delta e_d)``, to V as an
  output correction ``p_t * delta e_d`` (``delta`` = outlier - dequantized base, no dense copy);
- RoPE for keys stored pre-RoPE: cos/sin computed in the kernel from the int32 positions and the model's
  ``inv_freq``/``attention_scaling`` (angle reduced to [-pi, pi] first) and applied to the dequantized
  key halves in registers; no rotated key is written anywhere;
- GQA: the G query heads of a KV head are the rows of one ``tl.dot`` (padded to 16), K/V read once; a prefill
  chunk's ``n`` queries add rows (``R = G * n``, tiles of ``BLOCK_R``; ``triton_chunk.py``), all seeing every
  token (history precedes the chunk: no mask), RoPE stays on the key side;
- scores, online softmax and ``P @ V`` (float32 accumulation); each program writes a partial
  (max, sum, acc).

Not fused (torch, around the kernel): the query's scaling and ``rotate_half(q)`` (``[B, Hq, D]``), the
merge of the partials (a log-sum-exp over ``[B, Hq, splits]``), and every block the kernel does not
read: the full-precision residual and this step's new K/V (``Dense``), 3-bit blocks, ``ChannelSplit``
blocks (kvquant_stream's outlier channels), fp16 warm-up blocks, K/V pairs of mixed kinds. Those go
through the reference's tile path (``reference.attend_segment``) and are merged into the same softmax.
The kernel needs a power-of-two head dim >= 32; RoPE types whose ``inv_freq`` depends on the call's
positions (``dynamic``) use the reference entirely. The per-layer launch plan (block address tables,
outlier tile pointers) is cached until the layer's block list changes; blocks of one layout (widths,
axes, dtypes, sparsity) share one launch.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kvcomp.kernels.plan import plan
from kvcomp.kernels.reference import Softmax, attend_segment, kv_heads, segments, split_query
from kvcomp.kernels.rotary import rotate_half

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU installs: the reference path only
    triton = None


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether the kernel can run here: triton imports and there is a CUDA device or the interpreter."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


if triton is not None:

    @triton.jit
    def _dq(codes, scale, zero, bh, t, d, T, ng, grp, mask, BITS: tl.constexpr, TOK: tl.constexpr,
            D: tl.constexpr):
        """float32 value of element (bh, t, d) (broadcast index tensors) of a packed [B*H, T, D] block."""
        e = (bh * T + t) * D + d
        byte = tl.load(codes + e // (8 // BITS), mask=mask, other=0).to(tl.int32)
        code = (byte >> ((e % (8 // BITS)) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
        if TOK:
            si = (bh * T + t) * ng + d // grp
        else:
            si = (bh * D + d) * ng + t // grp
        s = tl.load(scale + si, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zero + si, mask=mask, other=0.0).to(tl.float32)
        return code.to(tl.float32) * s + z

    @triton.jit
    def _cos_sin(pos, invf, j, att, FAST: tl.constexpr):
        """RoPE cos/sin (x attention_scaling) of angle ``pos * inv_freq[j]``, reduced to [-pi, pi] first
        (Cody-Waite, 2*pi = 6.28125 + 127/2**16 + c3, exact products for angles < 4e5 rad), so the GPU's
        approximate sin/cos (``FAST``; abs error < 1e-6 on [-pi, pi]) hold at 128k positions."""
        ang = pos.to(tl.float32) * tl.load(invf + j)
        k = tl.floor(ang * 0.15915494309189535 + 0.5)
        r = ang - k * 6.28125
        r = r - k * 0.0019378662109375
        r = r + k * 2.559031372584286e-06
        if FAST:
            c, s = libdevice.fast_cosf(r), libdevice.fast_sinf(r)
        else:  # the interpreter has no libdevice
            c, s = tl.cos(r), tl.sin(r)
        return c * att, s * att

    @triton.jit
    def _mm(a, b, LOWP: tl.constexpr, DT: tl.constexpr):
        """``a @ b``: exact float32 FMA dot, or tensor cores in the model's 16-bit dtype ``DT``."""
        if LOWP:
            r = tl.dot(a.to(DT), b.to(DT))
        else:
            r = tl.dot(a, b, input_precision="ieee")
        return r

    @triton.jit
    def _outliers(meta, IDX: tl.constexpr, bh, o, om, T, D: tl.constexpr, OV: tl.constexpr):
        """(token, channel, value) of outliers ``o`` (masked by ``om``) of a Sparse block row ``bh``."""
        fi = tl.load(tl.load(meta + IDX).to(tl.pointer_type(tl.int32)) + o, mask=om, other=0).to(tl.int64)
        val = tl.load(tl.load(meta + IDX + 1).to(tl.pointer_type(OV)) + o, mask=om, other=0.0).to(tl.float32)
        rem = fi - bh * T * D
        return rem // D, rem % D, val

    @triton.jit
    def _decode_kernel(q_ptr, rq_ptr, meta_ptr, split_ptr, invf, m_ptr, l_ptr, acc_ptr, n_split, att, R, per,
                       n_entries, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_O: tl.constexpr, SPLIT: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
                       K_TOK: tl.constexpr, V_TOK: tl.constexpr, K_SP: tl.constexpr, V_SP: tl.constexpr,
                       K_ST: tl.constexpr, V_ST: tl.constexpr, K_OV: tl.constexpr, V_OV: tl.constexpr,
                       ROPE: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr, FAST: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)  # this program runs split entries [sp * per, (sp + 1) * per)
        HALF: tl.constexpr = D // 2
        offs_g, offs_t = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_T)
        offs_h, offs_d = tl.arange(0, HALF), tl.arange(0, D)
        gmask = offs_g < R
        qrow = (bh * R + offs_g[:, None]) * D
        q_lo = tl.load(q_ptr + qrow + offs_h[None, :], mask=gmask[:, None], other=0.0)
        q_hi = tl.load(q_ptr + qrow + HALF + offs_h[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D], tl.float32)
        for si in range(sp * per, tl.minimum(sp * per + per, n_entries)):
            meta = meta_ptr + tl.load(split_ptr + 2 * si).to(tl.int64) * 19
            t_start = tl.load(split_ptr + 2 * si + 1)
            T = tl.load(meta + 7)  # the layout's token count (a width arena: its capacity)
            t_end = tl.minimum(t_start + SPLIT, tl.load(meta + 18))  # the stored tokens
            kc = tl.load(meta + 0).to(tl.pointer_type(tl.uint8))
            ks = tl.load(meta + 1).to(tl.pointer_type(K_ST))
            kz = tl.load(meta + 2).to(tl.pointer_type(K_ST))
            vc = tl.load(meta + 3).to(tl.pointer_type(tl.uint8))
            vs = tl.load(meta + 4).to(tl.pointer_type(V_ST))
            vz = tl.load(meta + 5).to(tl.pointer_type(V_ST))
            pos = tl.load(meta + 6).to(tl.pointer_type(tl.int32))
            kng, kgrp, vng, vgrp = tl.load(meta + 8), tl.load(meta + 9), tl.load(meta + 10), tl.load(meta + 11)
            n_tiles = (T + BLOCK_T - 1) // BLOCK_T + 1  # row length of the outlier tile pointers
            for t0 in range(t_start, t_end, BLOCK_T):
                t = t0 + offs_t
                tm = t < t_end
                k_lo = _dq(kc, ks, kz, bh, t[:, None], offs_h[None, :], T, kng, kgrp, tm[:, None], KB, K_TOK, D)
                k_hi = _dq(kc, ks, kz, bh, t[:, None], offs_h[None, :] + HALF, T, kng, kgrp, tm[:, None], KB, K_TOK,
                           D)
                if ROPE:  # rotate the dequantized keys in registers (rotate_half pairs d, d + D/2)
                    c, s = _cos_sin(tl.load(pos + t, mask=tm, other=0)[:, None], invf, offs_h[None, :], att, FAST)
                    k_lo, k_hi = k_lo * c - k_hi * s, k_hi * c + k_lo * s
                sc = _mm(q_lo, tl.trans(k_lo), LOWP, DT) + _mm(q_hi, tl.trans(k_hi), LOWP, DT)
                if K_SP:  # an outlier replaces its dequantized value: add q . rot(delta e_d) to its token's score
                    optr = tl.load(meta + 14).to(tl.pointer_type(tl.int64)) + bh * n_tiles + t0 // BLOCK_T
                    for o0 in range(tl.load(optr), tl.load(optr + 1), BLOCK_O):
                        o = o0 + tl.arange(0, BLOCK_O)
                        om = o < tl.load(optr + 1)
                        ot, od, val = _outliers(meta, 12, bh, o, om, T, D, K_OV)
                        base = _dq(kc, ks, kz, bh, ot, od, T, kng, kgrp, om, KB, K_TOK, D)
                        delta = tl.where(om, val - base, 0.0)
                        qm = gmask[:, None] & om[None, :]
                        qa = tl.load(q_ptr + qrow + od[None, :], mask=qm, other=0.0)
                        if ROPE:  # q . rot(e_d) = q_d cos - rotate_half(q)_d sin
                            po = tl.load(pos + ot, mask=om, other=0)
                            co, so = _cos_sin(po[None, :], invf, od[None, :] % HALF, att, FAST)
                            qa = qa * co - tl.load(rq_ptr + qrow + od[None, :], mask=qm, other=0.0) * so
                        hot = tl.where(ot[:, None] - t0 == offs_t[None, :], 1.0, 0.0)
                        sc += tl.dot(qa * delta[None, :], hot, input_precision="ieee")
                sc = tl.where(tm[None, :], sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(sc - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = _dq(vc, vs, vz, bh, t[:, None], offs_d[None, :], T, vng, vgrp, tm[:, None], VB, V_TOK, D)
                acc = acc * alpha[:, None] + _mm(p, v, LOWP, DT)
                if V_SP:  # acc += p[token] * delta at (token, channel) of each outlier
                    vptr = tl.load(meta + 17).to(tl.pointer_type(tl.int64)) + bh * n_tiles + t0 // BLOCK_T
                    for v0 in range(tl.load(vptr), tl.load(vptr + 1), BLOCK_O):
                        vo = v0 + tl.arange(0, BLOCK_O)
                        vm = vo < tl.load(vptr + 1)
                        vt, vd, vval = _outliers(meta, 15, bh, vo, vm, T, D, V_OV)
                        vbase = _dq(vc, vs, vz, bh, vt, vd, T, vng, vgrp, vm, VB, V_TOK, D)
                        vdelta = tl.where(vm, vval - vbase, 0.0)
                        vhot = tl.where(vt[:, None] - t0 == offs_t[None, :], 1.0, 0.0)
                        pv = tl.dot(p, tl.trans(vhot), input_precision="ieee")  # [rows, outliers]: p of its token
                        hd = tl.where(vd[:, None] == offs_d[None, :], 1.0, 0.0)
                        acc += tl.dot(pv * vdelta[None, :], hd, input_precision="ieee")
                m_i = m_new
        out = (bh * n_split + sp) * R + offs_g
        tl.store(m_ptr + out, m_i, mask=gmask)
        tl.store(l_ptr + out, l_i, mask=gmask)
        tl.store(acc_ptr + out[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])


# -- host side ------------------------------------------------------------------------------------------
def _tl_dtype(dtype: torch.dtype) -> Any:
    return getattr(tl, str(dtype).removeprefix("torch."))


def fusable(layer: Any, d: int) -> bool:
    """Whether the kernel can read ``layer``'s packed blocks: a power-of-two head dim >= 32 and, for keys stored
    pre-RoPE, the plain rotate-half RoPE whose ``inv_freq`` does not depend on the call (not ``dynamic``)."""
    rope = layer.rope
    if d < 32 or d & (d - 1) or not layer.k_blocks:
        return False
    return rope is None or ("dynamic" not in str(getattr(rope.rotary, "rope_type", "")) and rope.split_half(d))


def fused_partials(q: torch.Tensor, layer: Any, state: Softmax, dt: torch.dtype | None, block_t: int, split: int,
                   block_o: int, block_r: int = 64, num_warps: int | None = None, programs: int = 0) -> list[int]:
    """Fold the kernel's pass over ``layer``'s fusable packed blocks into ``state`` (``[B, Hkv, R, ...]``).

    ``q``: scaled float32 ``[B, Hkv, R, D]``, contiguous; its ``R`` rows (the G query heads of a KV head, times
    the queries of a chunk) all see every token. A program reads ``split`` tokens of one block for
    ``block_r`` rows (>= 16). ``dt``: the 16-bit dtype of tensor-core dots, None = exact float32 dots.
    ``programs``: 0 = one program per split (flash-decoding: parallel over the history); else about that many
    programs in all, each running consecutive splits, so the float32 partials (``[B * Hkv, programs, R, D]``
    at most) stay bounded however long the history is. Returns the indices of the blocks it did not read (they
    go through a PyTorch path)."""
    b, hkv, r, d = q.shape
    if not fusable(layer, d):
        return list(range(len(layer.k_blocks)))
    groups, other = plan(layer, block_t, split)
    rotary = layer.rope.rotary if layer.rope is not None else None
    rq = rotate_half(q).contiguous()
    invf = rotary.inv_freq.float().contiguous() if rotary is not None else q
    att = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    block_r = max(16, min(block_r, triton.next_power_of_2(r)))
    row_tiles = triton.cdiv(r, block_r)
    for grp in groups:
        entries = grp["splits"].shape[0]
        per = 1 if not programs else triton.cdiv(entries, max(1, programs // (b * hkv * row_tiles)))
        n = triton.cdiv(entries, per)
        m = torch.empty(b * hkv, n, r, device=q.device)
        l_ = torch.empty_like(m)
        acc = torch.empty(b * hkv, n, r, d, device=q.device)
        kb, vb, ktok, vtok, ksp, vsp, kst, vst, kov, vov = grp["sig"]
        kst, vst, kov, vov = map(_tl_dtype, (kst, vst, kov, vov))
        _decode_kernel[(b * hkv, n, row_tiles)](
            q, rq, grp["meta"], grp["splits"], invf, m, l_, acc, n, att, r, per, entries,
            D=d, BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_O=block_o, SPLIT=split,
            KB=kb, VB=vb, K_TOK=ktok, V_TOK=vtok, K_SP=ksp, V_SP=vsp, K_ST=kst, V_ST=vst, K_OV=kov, V_OV=vov,
            ROPE=rotary is not None, LOWP=dt is not None, DT=tl.float32 if dt is None else _tl_dtype(dt),
            FAST=not interpreting(),
            num_warps=num_warps or (8 if d >= 128 else 4))
        m, l_, acc = m.view(b, hkv, n, r), l_.view(b, hkv, n, r), acc.view(b, hkv, n, r, d)
        mx = m.amax(dim=2)
        w = torch.exp(m - mx[:, :, None])
        state.merge(mx, (l_ * w).sum(dim=2), (acc * w[..., None]).sum(dim=2))
    return other


def check_args(block_t: int, split: int, block_o: int) -> None:
    """One clear error when triton cannot run here or the kernel sizes are invalid."""
    if not available():
        raise RuntimeError("the Triton decode kernel needs `pip install kvcomp[triton]` and a CUDA device "
                           "(or TRITON_INTERPRET=1 on CPU)")
    if split % block_t or block_t < 16 or block_o < 16:
        raise ValueError(f"block_t={block_t}, block_o={block_o} must be >= 16 and split={split} a multiple of block_t")


def dot_dtype(query: torch.Tensor, exact: bool) -> torch.dtype | None:
    """The query's 16-bit dtype for tensor-core dots, or None = exact float32 (for a float32 query, with
    ``exact``, and for bf16 under the interpreter, whose bf16 dot is wrong)."""
    lowp = not exact and (query.dtype == torch.float16 or (query.dtype == torch.bfloat16 and not interpreting()))
    return query.dtype if lowp else None


@torch.no_grad()
def decode_attention_triton(query: torch.Tensor, layer: Any, new_k: torch.Tensor | None = None,
                            new_v: torch.Tensor | None = None, scale: float | None = None, block_t: int = 32,
                            split: int = 256, block_o: int = 32, tile: int = 256, num_warps: int | None = None,
                            exact: bool = False) -> torch.Tensor:
    """Same contract as ``decode_attention_reference``; kernel for the packed blocks, reference for the rest.

    ``block_t``: tokens per kernel tile (>= 16); ``split``: tokens per program (a multiple of ``block_t``);
    ``block_o``: outliers per step (>= 16); ``tile``: the reference's tile for the other blocks.
    Dot products run in float32 (exact FMA) for a float32 query or with ``exact``; for a bf16/fp16
    query, ``q.K`` and ``P.V`` use tensor cores in that dtype (float32 accumulation), the precision the
    model's own attention has over its bf16 cache.
    """
    check_args(block_t, split, block_o)
    hkv = kv_heads(layer, new_k)
    q = split_query(query, hkv, scale).contiguous()
    b, _, g, d = q.shape
    state = Softmax.empty(b, hkv, g, d, query.device)
    other = fused_partials(q, layer, state, dot_dtype(query, exact), block_t, split, block_o,
                           num_warps=num_warps)
    ws = (torch.empty(b * hkv * tile * d, device=q.device), torch.empty(b * hkv * tile * d, device=q.device))
    segs = list(segments(layer, new_k, new_v))
    for i in [*other, *range(len(layer.k_blocks), len(segs))]:
        attend_segment(state, q, segs[i], layer.rope, tile, ws)
    return state.result(query.dtype)

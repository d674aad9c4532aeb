"""Bit packing of integer codes into uint8: 2, 3, 4 and 8 bits per code.

Codes are packed along a flat sequence. ``g`` codes of ``bits`` bits fill ``nb`` whole bytes
(2 bit: 4 codes/byte; 4 bit: 2/byte; 8 bit: 1/byte; 3 bit: 8 codes in 3 bytes), so ``n`` codes take
``ceil(n / g) * nb`` bytes. Everything is vectorised (no Python loop over codes) and runs on any device.
"""

from __future__ import annotations

import torch

#: bits -> (codes per word, bytes per word)
LAYOUT = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy once packed."""
    g, nb = _layout(bits)
    return -(-n // g) * nb


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, values in [0, 2**bits)) into a flat uint8 tensor."""
    g, nb = _layout(bits)
    if bits == 8:
        return codes.reshape(-1).to(torch.uint8)
    if nb == 1:  # 2/4 bit: OR of g strided uint8 slices (no int32 widening)
        flat = codes.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % g
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        words = flat.view(-1, g)
        out = words[:, 0].clone()
        for i in range(1, g):
            out.bitwise_or_(words[:, i] << (i * bits))
        return out
    flat = codes.reshape(-1).to(torch.int32)
    n = flat.numel()
    pad = (-n) % g
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(-1, g)
    shifts = torch.arange(g, device=flat.device, dtype=torch.int32) * bits
    word = (words << shifts).sum(dim=1)  # [n/g] int32, at most 24 bits used
    byte_shift = torch.arange(nb, device=flat.device, dtype=torch.int32) * 8
    return ((word[:, None] >> byte_shift) & 0xFF).to(torch.uint8).reshape(-1)


def pack_float(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack`` of float ``codes`` holding whole numbers in [0, 2**bits) (a quantizer's rounded values): the codes of
    a byte are summed with their place values in float (exact below 2**24) and converted once, instead of
    converting every code to uint8 and shifting bytes (both slow on CPU). Same bytes as ``pack``."""
    g, nb = _layout(bits)
    if nb != 1 or bits == 8:
        return pack(codes.to(torch.uint8), bits)
    flat = codes.reshape(-1)
    pad = (-flat.numel()) % g
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(-1, g)
    acc = torch.add(words[:, 0], words[:, 1], alpha=1 << bits)
    for i in range(2, g):
        acc.add_(words[:, i], alpha=1 << (i * bits))
    return acc.to(torch.int16).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``n`` codes as a flat uint8 tensor."""
    g, nb = _layout(bits)
    if bits == 8:
        return packed[:n]
    b = packed.to(torch.int32)
    if nb == 1:
        word = b
    else:
        byte_shift = torch.arange(nb, device=b.device, dtype=torch.int32) * 8
        word = (b.view(-1, nb) << byte_shift).sum(dim=1)
    shifts = torch.arange(g, device=b.device, dtype=torch.int32) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)


def _layout(bits: int) -> tuple[int, int]:
    if bits not in LAYOUT:
        raise ValueError(f"bits={bits} cannot be packed; allowed: {', '.join(map(str, LAYOUT))}")
    return LAYOUT[bits]

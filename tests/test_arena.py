"""The per-layer arena (``kvcomp/cache/arena.py``): one slot per storage layout, the same bytes and values as the
quantizer's per-chunk blocks, views that later appends leave unchanged, exact demotes, rows shared by beams."""

from __future__ import annotations

import torch

from kvcomp.cache.rewrite import demote
from kvcomp.cache.selfcheck import CASES, build_layer
from kvcomp.cache.storage import Rows, nbytes

UNIFORM8 = CASES["uniform8"]  # token-axis keys and values: width arenas
TOKEN4 = {"name": "uniform", "key_bits": 4, "value_bits": 4, "key_group_size": 16, "value_group_size": 16}


def _per_chunk(layer, k: torch.Tensor, v: torch.Tensor, chunk: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Bytes and dequantized K/V of the blocks the quantizer returns chunk by chunk (what the arena copies)."""
    q, state, total, ks, vs = layer.quantizer, layer.quantizer.init_state(), 0, [], []
    for s in range(0, k.shape[2], chunk):
        pos = torch.arange(s, min(k.shape[2], s + chunk), dtype=torch.int32)
        for seg in q.compress(k[..., s : s + chunk, :], v[..., s : s + chunk, :], pos, state):
            total += nbytes(seg.keys) + nbytes(seg.values) + pos.nbytes
            ks.append(seg.keys.dequantize(torch.float32))
            vs.append(seg.values.dequantize(torch.float32))
    return total, torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def test_one_slot_per_layout_same_bytes_and_values_as_the_chunks() -> None:
    layer = build_layer(TOKEN4, t=0, decode=0, d=32)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 200, 32, generator=g), torch.randn(1, 2, 200, 32, generator=g)
    for s in range(0, 200, 32):
        pos = torch.arange(s, min(200, s + 32), dtype=torch.int32)
        layer.compress(k[..., s : s + 32, :], v[..., s : s + 32, :], pos, torch.full((pos.numel(),), float("nan")))
    assert len(layer.k_blocks) == 1 and layer.k_blocks[0].shape[2] == 200  # 7 chunks, one width arena
    slot = layer.arena.slots[0]
    assert slot.bufs[0].capacity >= 200 and slot.bufs[0].capacity == slot.bufs[1].capacity
    kv = layer.stats()
    assert kv["kv_bytes"] == sum(t.nbytes for t in layer.tensors())
    total, ks, vs = _per_chunk(layer, k, v, 32)  # what the quantizer returns chunk by chunk
    assert kv["key_bytes"] + kv["value_bytes"] + kv["index_bytes"] == total
    assert torch.equal(ks, layer.k_blocks[0].dequantize(torch.float32))
    assert torch.equal(vs, layer.v_blocks[0].dequantize(torch.float32))
    assert torch.equal(layer.pos_blocks[0], torch.arange(200, dtype=torch.int32))
    assert layer.owner.kv_bytes_reserved >= layer.owner.kv_bytes


def test_views_survive_appends_and_growth() -> None:
    layer = build_layer(UNIFORM8, t=64, chunk=32, decode=0)
    hist = layer.history()
    before = [(b.dequantize(torch.float32).clone(), b.tensors()[0].data_ptr()) for b in hist.k_blocks]
    cap = layer.arena.slots[0].bufs[0].capacity
    k = torch.randn(1, 2, 300, 32)
    layer.update(k, k)  # grows the arena past its capacity
    assert layer.arena.slots[0].bufs[0].capacity > cap and layer.k_blocks[0].shape[2] == 364
    for blk, (x, _) in zip(hist.k_blocks, before, strict=True):
        assert blk.shape[2] == 64 and torch.equal(blk.dequantize(torch.float32), x)
    assert torch.equal(layer.k_blocks[0].dequantize(torch.float32)[:, :, :64], before[0][0])


def test_demote_copies_tokens_that_keep_their_width() -> None:
    layer = build_layer(UNIFORM8, t=96, chunk=32, decode=0)
    k0 = layer.k_blocks[0].dequantize(torch.float32)
    bits = torch.full((96,), -1, dtype=torch.int64)
    bits[10:20] = 4
    bits[50:55] = 0
    dropped = demote(layer, bits)
    assert dropped == 5 and layer.held() == 91
    widths = {int(p): b.width for b, pos in zip(layer.k_blocks, layer.pos_blocks, strict=True) for p in pos.tolist()}
    assert {p for p, w in widths.items() if w == 4} == set(range(10, 20))
    same = [p for p in range(96) if not (10 <= p < 20 or 50 <= p < 55)]
    slot8 = next(i for i, b in enumerate(layer.k_blocks) if b.width == 8)
    pos8 = layer.pos_blocks[slot8].long()
    assert pos8.tolist() == same
    assert torch.equal(layer.k_blocks[slot8].dequantize(torch.float32), k0[:, :, pos8])  # bit-exact


def test_select_rows_shares_the_arena() -> None:
    layer = build_layer(UNIFORM8, b=2, t=64, chunk=32, decode=0)
    k = layer.k_blocks[0].dequantize(torch.float32)
    rows = torch.tensor([1, 1, 0])
    layer.select_rows(rows)
    blk = layer.k_blocks[0]
    assert isinstance(blk, Rows) and torch.equal(blk.dequantize(torch.float32), k[rows])
    new = torch.randn(3, 2, 40, 32)
    layer.update(new, new)  # the new batch's tokens open a new width arena
    assert len(layer.k_blocks) == 2 and layer.k_blocks[1].shape[:3] == (3, 2, 40)
    assert layer.stats()["kv_bytes"] == sum(t.nbytes for t in layer.tensors())

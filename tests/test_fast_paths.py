"""CPU fast paths equal the plain computation they replace: packing from floats, column splits by runs, the
unpacking of 2/4-bit codes on widened words, and the running-score merge (cheap, no model)."""

from __future__ import annotations

import pytest
import torch

from kvcomp.cache.packing import pack, pack_float, unpack
from kvcomp.cache.split import columns, rest_columns
from kvcomp.cache.tiles import _unpack_bytes
from kvcomp.compressor.precision import RunningScores


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 3, 77, 64), (1, 1, 5, 3)])
def test_pack_float_equals_pack(bits: int, shape: tuple[int, ...]) -> None:
    q = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits)).float()
    assert torch.equal(pack_float(q, bits), pack(q.to(torch.uint8), bits))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_bytes_equals_unpack(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (6 * 40,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(_unpack_bytes(packed.view(6, -1), bits).reshape(-1), unpack(packed, bits, codes.numel()))


@pytest.mark.parametrize("cols", [[0, 1, 5, 63, 64, 100, 191], [7], list(range(60, 70))])
def test_columns_by_runs_equal_a_gather(cols: list[int]) -> None:
    x = torch.randn(2, 3, 9, 64, generator=torch.Generator().manual_seed(1))
    c = torch.tensor(cols, dtype=torch.int32)
    rest, special = columns(x, c)
    flat = x.transpose(1, 2).reshape(2, 9, 192)
    assert torch.equal(rest[:, 0], flat[..., rest_columns(192, c.long())])
    assert torch.equal(special[:, 0], flat[..., c.long()])


def test_running_scores_merge_equals_a_sort() -> None:
    r, ref = RunningScores(cap=100), torch.zeros(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 7, (13,), generator=g).float() / 3  # ties on purpose
        r.add(0, s)
        ref = torch.sort(torch.cat([ref, s])).values
        if ref.numel() > 100:
            ref = ref[ref.numel() % 2 :: 2]
        assert torch.equal(r.sorted[0], ref)

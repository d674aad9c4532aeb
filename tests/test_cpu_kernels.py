"""The compiled CPU kernels (kvcomp/kernels/cpu.py) equal their plain-torch references on every stored block type,
and a build failure falls back to the torch path with one warning line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO

from kvcomp.cache.selfcheck import CASES, build_layer
from kvcomp.kernels import cpu
from kvcomp.kernels.chunk import chunk_attention

pytestmark = pytest.mark.skipif(cpu.ops() is None, reason="the compiled CPU kernels could not be built here")


def _blocks(layer):
    return [*layer.k_blocks, *layer.v_blocks]


@pytest.mark.parametrize("case", sorted(CASES))
def test_tile_into_equals_reference_on_every_block(case: str) -> None:
    layer = build_layer(CASES[case], b=2, hkv=2, d=32, t=100, chunk=32)
    assert _blocks(layer), case
    g = torch.Generator().manual_seed(0)
    for block in _blocks(layer):
        b, h, t, d = block.shape
        for t0, t1 in ((0, t), (1, max(2, t // 2)), (t - 1, t)):
            want = torch.empty(b, h, t1 - t0, d)
            block.tile_reference(t0, t1, want)
            ws = torch.full((b, h, t1 - t0 + 3, d), float("nan"))  # a strided workspace slot
            got = block.tile_into(t0, t1, ws[:, :, 1 : 1 + t1 - t0])
            assert torch.allclose(got, want, atol=1e-6, rtol=0), (case, type(block).__name__, t0, t1)
            cos, sin = torch.randn(t1 - t0, d, generator=g), torch.randn(t1 - t0, d, generator=g)
            rot = block.tile_into(t0, t1, torch.empty(b, h, t1 - t0, d), (cos, sin))
            assert torch.allclose(rot, cpu.rotate_rows(want.clone(), (cos, sin)), atol=1e-5), (case, t0, t1)


@pytest.mark.parametrize("case", ["uniform4", "kvquant_stream", "livekvquant4", "kivi2"])
def test_chunk_attention_same_with_and_without_kernels(case: str, monkeypatch) -> None:
    layer = build_layer(CASES[case], b=1, hkv=2, d=32, t=90, chunk=32, start=5000)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, 32, generator=g)
    k, v = torch.randn(1, 2, 5, 32, generator=g), torch.randn(1, 2, 5, 32, generator=g)
    fast = chunk_attention(q, layer.history(), k, v, 32**-0.5, layer.rope)
    monkeypatch.setenv("KVCOMP_CPU_KERNELS", "0")
    slow = chunk_attention(q, layer.history(), k, v, 32**-0.5, layer.rope)
    assert torch.allclose(fast[0], slow[0], atol=1e-5) and torch.allclose(fast[1], slow[1], atol=1e-5)


def test_failed_build_warns_once_and_uses_torch() -> None:
    code = (
        "import warnings, torch\n"
        "from kvcomp.kernels import cpu\n"
        "def boom():\n    raise OSError('no compiler here')\n"
        "cpu._build = boom\n"
        "from kvcomp.cache.selfcheck import CASES, build_layer\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    layer = build_layer(CASES['uniform4'])\n"
        "    from kvcomp.kernels.chunk import chunk_attention\n"
        "    q = torch.randn(1, 4, 3, 32); k = torch.randn(1, 2, 3, 32)\n"
        "    chunk_attention(q, layer.history(), k, k, 0.2, layer.rope)\n"
        "    chunk_attention(q, layer.history(), k, k, 0.2, layer.rope)\n"
        "msgs = [str(x.message) for x in w if 'compiled CPU kernels' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no compiler here" in out.stdout and "plain-torch path" in out.stdout


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("b,d", [(1, 32), (2, 32), (1, 64), (2, 128)])
@pytest.mark.parametrize("generic", [False, True])
def test_decode_kernel_equals_materialize_oracle(case: str, b: int, d: int, generic: bool) -> None:
    """Both decode kernels (vectorised and generic) on every block type and head dims 32 / 64 / 128."""
    from kvcomp.cache.layer import materialized_attention
    from kvcomp.kernels.decode import decode_attention_cpu

    layer = build_layer(CASES[case], b=b, hkv=2, d=d, t=300, chunk=64, start=1000)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, 6, 1, d, generator=g)
    k, v = torch.randn(b, 2, 1, d, generator=g), torch.randn(b, 2, 1, d, generator=g)
    got = decode_attention_cpu(q, layer.history(), k, v, d**-0.5, layer.rope, generic=generic)
    assert got is not None
    want = materialized_attention(layer, q, k, v, torch.arange(layer.seen, layer.seen + 1), d**-0.5)
    assert (got[0] - want[0]).abs().max() < 1e-4 and (got[1] - want[1]).abs().max() < 1e-4, case


@pytest.mark.parametrize("case", ["uniform4", "kvquant_stream", "livekvquant4"])
def test_shared_beam_rows_equal_the_oracle(case: str) -> None:
    """Blocks shared by beams (``Rows``) through the decode kernel and the tiled chunk path."""
    from kvcomp.cache.layer import materialized_attention
    from kvcomp.kernels.decode import decode_attention_cpu

    layer = build_layer(CASES[case], b=2, hkv=2, d=32, t=200, chunk=64, start=10)
    layer.select_rows(torch.tensor([1, 0, 1]))
    g = torch.Generator().manual_seed(3)
    for n in (1, 4):
        q, k = torch.randn(3, 6, n, 32, generator=g), torch.randn(3, 2, n, 32, generator=g)
        want = materialized_attention(layer, q, k, k, torch.arange(layer.seen, layer.seen + n), 32**-0.5)[0]
        got = (decode_attention_cpu(q, layer.history(), k, k, 32**-0.5, layer.rope) if n == 1 else
               chunk_attention(q, layer.history(), k, k, 32**-0.5, layer.rope))
        assert (got[0] - want).abs().max() < 1e-4, (case, n)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d", [7, 13, 30])
def test_rows_starting_inside_a_byte_unpack_like_the_reference(bits: int, d: int) -> None:
    """Widths that are no multiple of a byte's codes (a channel split's normal part): rows start and end inside a
    byte; the compiled unpack (leading codes, whole bytes, trailing codes) equals the plain-torch gather."""
    from kvcomp.cache.quant import quantize

    x = torch.randn(2, 3, 11, d, generator=torch.Generator().manual_seed(bits * d))
    for axis in ("token", "channel"):
        block = quantize(x, bits, axis, 0)
        for t0, t1 in ((0, 11), (3, 8), (10, 11)):
            want = torch.empty(2, 3, t1 - t0, d)
            block.tile_reference(t0, t1, want)
            got = block.tile_into(t0, t1, torch.empty(2, 3, t1 - t0, d))
            assert torch.allclose(got, want, atol=1e-6, rtol=0), (bits, d, axis, t0)


def test_decode_kernel_refuses_positions_outside_the_rope_table() -> None:
    """A stored position with no row in the cos/sin table (a caller's bound too small) is an error, not a read past
    the table."""
    ops = cpu.ops()
    q, k = torch.randn(1, 2, 3, 32), torch.randn(1, 2, 4, 32)
    meta = torch.tensor(cpu.dense_meta(k, []), dtype=torch.int64)
    cos = sin = torch.ones(8, 16)
    m, l, acc = torch.full((1, 2, 3), float("-inf")), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, 32)
    ok = torch.tensor([0, 1, 2, 7], dtype=torch.int32)
    ops.decode_partial(q, meta, meta, 0, 4, ok, cos, sin, m, l, acc)
    with pytest.raises(RuntimeError, match="outside the rope table"):
        ops.decode_partial(q, meta, meta, 0, 4, torch.tensor([0, 1, 2, 8], dtype=torch.int32), cos, sin, m, l, acc)


@pytest.mark.parametrize("case", ["uniform4", "kvquant_stream", "livekvquant4"])
def test_decode_kernel_split_over_threads_equals_the_oracle(case: str) -> None:
    """Blocks long enough to be split over two threads (flash-decoding, partial states merged)."""
    from kvcomp.cache.layer import materialized_attention
    from kvcomp.kernels.decode import decode_attention_cpu

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer = build_layer(CASES[case], b=1, hkv=2, d=64, t=1100, chunk=1024, start=7)
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(1, h, 1, 64, generator=g) for h in (6, 2, 2))
        for generic in (False, True):
            got = decode_attention_cpu(q, layer.history(), k, v, 0.125, layer.rope, generic=generic)
            want = materialized_attention(layer, q, k, v, torch.arange(layer.seen, layer.seen + 1), 0.125)
            assert (got[0] - want[0]).abs().max() < 1e-4 and (got[1] - want[1]).abs().max() < 1e-4, (case, generic)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", ["kvquant_stream", "livekvquant4", "livekvquant2"])
def test_meta_tile_reads_split_and_sparse_blocks_in_one_pass(case: str) -> None:
    """Channel splits and dense-and-sparse blocks are tiled by the compiled ``meta_tile`` (not their part-by-part
    path), equal to the plain-torch reference, rotated or not, batch 2, at any token offset."""
    from kvcomp.cache.quant import Sparse
    from kvcomp.cache.split import ChannelSplit
    from kvcomp.kernels.decode import meta_tile

    layer = build_layer(CASES[case], b=2, hkv=2, d=32, t=100, chunk=32)
    mixed = [blk for blk in _blocks(layer) if isinstance(blk, ChannelSplit | Sparse)]
    assert mixed, case
    g = torch.Generator().manual_seed(3)
    for block in mixed:
        b, h, t, d = block.shape
        for t0, t1 in {(0, t), (t // 3, t - t // 4), (t - 1, t)}:
            want = torch.empty(b, h, t1 - t0, d)
            block.tile_reference(t0, t1, want)
            got = torch.full((b, h, t1 - t0, d), float("nan"))
            assert meta_tile(block, t0, got), (case, type(block).__name__)
            assert torch.allclose(got, want, atol=1e-6, rtol=0), (case, type(block).__name__, t0, t1)
            cos, sin = torch.randn(t1 - t0, d, generator=g), torch.randn(t1 - t0, d, generator=g)
            assert meta_tile(block, t0, got, (cos, sin))
            assert torch.allclose(got, cpu.rotate_rows(want.clone(), (cos, sin)), atol=1e-5), (case, t0, t1)

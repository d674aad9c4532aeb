"""The whole-layer decode kernel (``decode_layer``: every segment of a layer in one call, one parallel region) equals
the materialize oracle and the per-segment kernel, and its plan of the stored segments is kept on the store only
while the store has not changed."""

from __future__ import annotations

import pytest
import torch

from kvcomp.cache.layer import materialized_attention
from kvcomp.cache.selfcheck import CASES, build_layer
from kvcomp.kernels import cpu
from kvcomp.kernels.decode import decode_attention_cpu, decode_layer_cpu

pytestmark = pytest.mark.skipif(cpu.ops() is None, reason="the compiled CPU kernels could not be built here")


def _step(b: int, d: int, hkv: int = 2, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3 * hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g),
            torch.randn(b, hkv, 1, d, generator=g))


def _close(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], what: object) -> None:
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape, what
    assert (got[0] - want[0]).abs().max() < 1e-4 and (got[1] - want[1]).abs().max() < 1e-4, what


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("b,d", [(1, 32), (2, 32), (1, 64), (2, 128)])
def test_layer_kernel_equals_the_oracle_and_the_per_segment_kernel(case: str, b: int, d: int) -> None:
    """Every block type (packed, channel split, sparse outliers, fp sinks / warm-up, the fp residual), several
    segments per layer (64-token chunks: pages and width arenas), batch 1 and 2."""
    layer = build_layer(CASES[case], b=b, hkv=2, d=d, t=300, chunk=64, start=1000)
    assert len(layer.history().k_blocks) >= 1 and layer.res_k is not None, case
    q, k, v = _step(b, d)
    got = decode_layer_cpu(q, layer.history(), k, v, d**-0.5, layer.rope)
    assert got is not None
    want = materialized_attention(layer, q, k, v, torch.arange(layer.seen, layer.seen + 1), d**-0.5)
    _close(got, want, case)
    _close(got, decode_attention_cpu(q, layer.history(), k, v, d**-0.5, layer.rope), case)


@pytest.mark.parametrize("case", ["uniform4", "uniform3", "kvquant_stream", "livekvquant4"])
def test_layer_kernel_generic_head_dim_equals_the_oracle(case: str) -> None:
    """A head dim the vectorised kernel does not take (48): the entry runs the generic kernel per segment."""
    layer = build_layer(CASES[case], b=2, hkv=2, d=48, t=300, chunk=64, start=50)
    q, k, v = _step(2, 48)
    got = decode_layer_cpu(q, layer.history(), k, v, 48**-0.5, layer.rope)
    _close(got, materialized_attention(layer, q, k, v, torch.arange(layer.seen, layer.seen + 1), 48**-0.5), case)


@pytest.mark.parametrize("case", ["uniform4", "kvquant_stream", "livekvquant4", "livekvquant2", "kivi2"])
@pytest.mark.parametrize("b", [1, 2])
def test_layer_kernel_over_two_threads_equals_the_oracle(case: str, b: int) -> None:
    """Enough tokens for two threads: a thread's token range starts and ends inside segments and spans several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer = build_layer(CASES[case], b=b, hkv=2, d=64, t=1100, chunk=96, start=7)
        q, k, v = _step(b, 64, seed=5)
        got = decode_layer_cpu(q, layer.history(), k, v, 0.125, layer.rope)
        want = materialized_attention(layer, q, k, v, torch.arange(layer.seen, layer.seen + 1), 0.125)
        _close(got, want, (case, b))
    finally:
        torch.set_num_threads(threads)


def test_plan_is_kept_until_the_store_changes() -> None:
    """A second step over an unchanged store reuses the plan; a store (append) or a replaced slot invalidates it,
    and the step after it still equals the oracle."""
    layer = build_layer(CASES["kvquant_stream"], b=1, hkv=2, d=64, t=600, chunk=128, start=3)
    q, k, v = _step(1, 64)
    decode_layer_cpu(q, layer.history(), k, v, 0.125, layer.rope)
    kept = layer.arena.plan
    assert kept is not None and kept[0] == layer.arena.version
    decode_layer_cpu(q, layer.history(), k, v, 0.125, layer.rope)
    assert layer.arena.plan is kept
    version = layer.arena.version
    x = torch.randn(1, 2, 300, 64)
    layer.compress(x, x, torch.arange(layer.seen, layer.seen + 300, dtype=torch.int32), torch.zeros(300))
    layer.seen += 300
    assert layer.arena.version > version and layer.arena.plan is None
    got = decode_layer_cpu(q, layer.history(), k, v, 0.125, layer.rope)
    _close(got, materialized_attention(layer, q, k, v, torch.arange(layer.seen, layer.seen + 1), 0.125), "after")
    assert layer.arena.plan is not None and layer.arena.plan[0] == layer.arena.version


def test_a_history_taken_before_a_change_does_not_take_the_newer_plan() -> None:
    layer = build_layer(CASES["uniform4"], b=1, hkv=2, d=32, t=300, chunk=64, start=0)
    q, k, v = _step(1, 32)
    old = layer.history()
    x = torch.randn(1, 2, 64, 32)
    layer.compress(x, x, torch.arange(layer.seen, layer.seen + 64, dtype=torch.int32), torch.zeros(64))
    decode_layer_cpu(q, layer.history(), k, v, 32**-0.5, layer.rope)  # plans the new store
    got = decode_layer_cpu(q, old, k, v, 32**-0.5, layer.rope)
    _close(got, decode_attention_cpu(q, old, k, v, 32**-0.5, layer.rope), "old history")


@pytest.mark.parametrize("case", ["uniform4", "kvquant_stream", "livekvquant4"])
def test_shared_beam_rows_through_the_layer_kernel(case: str) -> None:
    """Beam-shared rows are read as tiles built for the call: the plan is not kept."""
    layer = build_layer(CASES[case], b=2, hkv=2, d=32, t=200, chunk=64, start=10)
    layer.select_rows(torch.tensor([1, 0, 1]))
    q, k, v = _step(3, 32)
    got = decode_layer_cpu(q, layer.history(), k, v, 32**-0.5, layer.rope)
    _close(got, materialized_attention(layer, q, k, v, torch.arange(layer.seen, layer.seen + 1), 32**-0.5), case)


def test_layer_kernel_refuses_positions_outside_the_rope_table() -> None:
    """A stored segment's or the residual's position with no row in the cos/sin table is an error, not a read past
    the table."""
    ops = cpu.ops()
    q, k = torch.randn(1, 2, 3, 32), torch.randn(1, 2, 4, 32)
    meta = torch.tensor([cpu.dense_meta(k, [])], dtype=torch.int64)
    cos = sin = torch.ones(8, 16)
    ok, bad = torch.tensor([0, 1, 2, 7], dtype=torch.int32), torch.tensor([0, 1, 2, 8], dtype=torch.int32)
    none = torch.empty(0, dtype=torch.int32)
    seg = torch.tensor([[4, ok.data_ptr(), 8]])
    ops.decode_layer(q, 0.2, meta, meta, seg, [k, k, ok], cos, sin)
    with pytest.raises(RuntimeError, match="outside the rope table"):
        ops.decode_layer(q, 0.2, meta, meta, torch.tensor([[4, bad.data_ptr(), 9]]), [k, k, none], cos, sin)
    with pytest.raises(RuntimeError, match="outside the rope table"):
        ops.decode_layer(q, 0.2, meta, meta, seg, [k, k, bad], cos, sin)

"""Fused decode attention (``kvcomp.kernels``): the tile-wise reference equals the standard
dequantize-then-attend path on real cache layers (CPU); the Triton kernel equals the reference under the
Triton interpreter (subprocess, CPU) and on CUDA; every quantizer's storage round-trips on CUDA."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from conftest import REPO
from test_quant import QUANTIZER_CFGS

from kvcomp.cache.packing import pack, unpack
from kvcomp.cache.quant import Packed
from kvcomp.cache.selfcheck import CASES, build_layer, check
from kvcomp.kernels import decode_attention, resolve
from kvcomp.kernels.plan import plan

TOL = 1e-4  # float32: both sides differ only in summation order
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# -- CPU: reference == standard path ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_standard_path(case: str) -> None:
    """8 query heads on 2 KV heads (GQA 4:1), keys pre-RoPE, residual + this step's new token."""
    err = check(case, "reference", hq=8)
    assert err < TOL, f"{case}: reference vs materialize+SDPA max abs error {err:.3e}"


@pytest.mark.parametrize(("case", "b", "hq", "tile"), [("uniform2", 2, 2, 5), ("livekvquant2", 1, 2, 7),
                                                       ("kvquant_stream", 2, 4, 3), ("uniform8", 1, 16, 64)])
def test_reference_batch_heads_and_tiles(case: str, b: int, hq: int, tile: int) -> None:
    """Batch 2, no GQA / GQA 2:1 / 8:1, tiles that split blocks (outliers and sinks across tile edges)."""
    err = check(case, "reference", b=b, hq=hq, tile=tile)
    assert err < TOL, f"{case} b={b} hq={hq} tile={tile}: max abs error {err:.3e}"


def test_reference_reads_packed_blocks_tile_by_tile(monkeypatch) -> None:
    """The reference never dequantizes a whole block nor materializes the layer."""
    layer = build_layer(CASES["livekvquant4"])

    def boom(*a, **k):
        raise AssertionError("whole-block dequantize/materialize called")

    monkeypatch.setattr(Packed, "dequantize", boom)
    monkeypatch.setattr(type(layer), "materialize", boom)
    out = decode_attention(torch.randn(1, 8, 1, 32), layer, impl="reference", tile=8)
    assert out.shape == (1, 8, 1, 32) and torch.isfinite(out).all()


def test_plan_groups_blocks_and_follows_the_layer() -> None:
    """The kernel's launch plan (triton-free): fused vs fallback blocks, cached while the blocks are the
    same, rebuilt when blocks are added, and never keeps a reset layer's blocks alive."""
    layer = build_layer(CASES["livekvquant4"])
    groups, other = plan(layer, 16, 32)
    assert other == [0]  # the fp16 warm-up block goes to the reference path
    (grp,) = groups
    kb = layer.k_blocks[1]
    assert grp["sig"][:6] == (4, 4, False, True, True, True) and int(grp["meta"][0, 0]) == kb.base.codes.data_ptr()
    assert plan(layer, 16, 32)[0] is groups
    k = torch.randn(1, 2, 40, 32)
    layer.update(k, k)
    assert plan(layer, 16, 32)[0] is not groups and len(plan(layer, 16, 32)[0][0]["meta"]) == len(layer.k_blocks) - 1
    ref = weakref.ref(kb)
    layer.reset()
    del kb, grp, groups
    gc.collect()
    assert ref() is None


def test_dispatch() -> None:
    q = torch.zeros(1, 4, 1, 32)
    assert resolve("auto", q) == "reference"  # CPU default stays the reference path
    with pytest.raises(ValueError, match="allowed: auto, reference, triton"):
        resolve("fast", q)
    layer = build_layer(CASES["uniform4"], t=20, decode=0)
    with pytest.raises(ValueError, match="one query step"):
        decode_attention(torch.zeros(1, 4, 2, 32), layer)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(torch.zeros(1, 3, 1, 32), layer)


def test_triton_path_without_triton(monkeypatch) -> None:
    """A CPU install without triton: the kernel reports unavailable, "auto" keeps the reference path and
    asking for "triton" is one clear error."""
    from kvcomp.kernels import triton_decode

    monkeypatch.setattr(triton_decode, "triton", None)
    assert not triton_decode.available()
    layer = build_layer(CASES["uniform4"], t=20, decode=0)
    q = torch.randn(1, 4, 1, 32)
    assert torch.equal(decode_attention(q, layer), decode_attention(q, layer, impl="reference"))
    with pytest.raises(RuntimeError, match=r"kvcomp\[triton\]"):
        decode_attention(q, layer, impl="triton")


# -- Triton interpreter (CPU) ---------------------------------------------------------------------------------
#: (case, check kwargs, tolerance): every bit width and layout, sparse outliers (+ an fp16 warm-up block),
#: ChannelSplit fallback, no RoPE (kivi), batch 2 without GQA at 128k positions, fp16 tensor-core dots
INTERP = [(c, {}, TOL) for c in ("uniform2", "uniform4", "uniform8", "kivi2", "livekvquant4", "kvquant_stream")] + [
    ("livekvquant4", {"b": 2, "hq": 2, "start": 131000}, TOL),
    ("uniform4", {"dtype": "float16"}, 2e-2),
]


@pytest.mark.slow  # a subprocess run
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[triton]')")
def test_triton_kernel_under_interpreter() -> None:
    """Kernel vs reference with 16-token tiles, 32-token splits and 16-outlier steps (every loop runs more
    than once). TRITON_INTERPRET must be set before triton is imported, hence one subprocess for all."""
    code = (
        "import json, sys, torch\n"
        "from kvcomp.cache.selfcheck import check\n"
        "out = []\n"
        "for case, kw in json.loads(sys.argv[1]):\n"
        "    kw = {k: getattr(torch, v) if k == 'dtype' else v for k, v in kw.items()}\n"
        "    out.append(check(case, 'triton', block_t=16, split=32, block_o=16, **kw))\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    arg = json.dumps([(c, kw) for c, kw, _ in INTERP])
    res = subprocess.run([sys.executable, "-c", code, arg], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    errs = json.loads(res.stdout.strip().splitlines()[-1])
    report = {f"{c} {kw}": f"{e:.2e}" for (c, kw, _), e in zip(INTERP, errs)}
    assert len(errs) == len(INTERP) and all(e < tol for (_, _, tol), e in zip(INTERP, errs)), \
        f"kernel vs reference max abs errors: {report}"


# -- CUDA (skipped without a GPU) -----------------------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", ["uniform2", "uniform4", "uniform8", "kivi2", "livekvquant4", "livekvquant2",
                                  "kvquant_stream"])
@pytest.mark.parametrize(("b", "hq"), [(1, 8), (2, 2)])
def test_triton_kernel_cuda(case: str, b: int, hq: int) -> None:
    assert resolve("auto", torch.zeros(1, device="cuda")) == "triton"
    err = check(case, "triton", device="cuda", b=b, hq=hq, d=64, t=300)
    assert err < TOL, f"{case} b={b} hq={hq}: kernel vs reference max abs error {err:.3e}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", ["uniform4", "livekvquant4"])
def test_triton_kernel_cuda_bf16(case: str) -> None:
    """bf16 cache and query (the model dtype on GPU): float32 inside both paths, bf16 output."""
    err = check(case, "triton", device="cuda", hq=8, d=128, t=600, dtype=torch.bfloat16)
    assert err < 2e-2, f"{case} bf16: kernel vs reference max abs error {err:.3e}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_cuda(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (1001,), device="cuda")
    packed = pack(codes, bits)
    assert packed.is_cuda and torch.equal(unpack(packed, bits, 1001).long(), codes)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", list(QUANTIZER_CFGS))
def test_quantizer_round_trip_cuda(name: str) -> None:
    """Each quantizer through a real cache layer on CUDA: all storage stays on the GPU and dequantizes to
    what the same layer gives on CPU (codes may differ by one step where rounding ties differ)."""
    cfg = {"name": "uniform" if name == "int8" else name, **QUANTIZER_CFGS[name]}
    gpu, cpu = build_layer(cfg, device="cuda"), build_layer(cfg, device="cpu")
    assert all(t.is_cuda for t in gpu.tensors())
    kg, vg = gpu.materialize()
    kc, vc = cpu.materialize()
    for a, b in ((kg, kc), (vg, vc)):
        diff = (a.cpu() - b).abs()
        assert diff.mean() < 1e-3 * b.abs().mean() + 1e-6, f"{name}: mean |cuda - cpu| {diff.mean():.3e}"

"""Attention straight from the packed cache (``kvcomp.kernels.chunk`` via the ``kvcomp_packed`` attention
function): equal to the materialize oracle on every block type and every method, installed per model
instance only for the run, and never building a full-precision copy of a layer's history."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose

from kvcomp.cache.layer import CompressedLayer, materialized_attention
from kvcomp.cache.quant import Packed
from kvcomp.cache.selfcheck import CASES, build_layer
from kvcomp.kernels import interface
from kvcomp.kernels.chunk import chunk_attention

TOL = 1e-4  # float32
METHODS = ("int8", "int4", "kivi", "kvquant_stream", "livekvquant", "prompt_guided", "snapkv", "h2o", "fastkv")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [1, 9])
def test_chunk_attention_equals_oracle_on_every_block_type(case: str, n: int) -> None:
    """GQA 3:1, a decode step (n=1) and a chunk of 9 queries, tiles of 16 tokens splitting blocks."""
    layer = build_layer(CASES[case], hkv=2, d=32, t=100, chunk=32, decode=3, start=5000)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, n, 32, generator=g)
    k, v = torch.randn(1, 2, n, 32, generator=g), torch.randn(1, 2, n, 32, generator=g)
    pos = torch.arange(layer.seen, layer.seen + n)
    want, want_lse = materialized_attention(layer, q, k, v, pos, 32**-0.5)
    got, lse = chunk_attention(q, layer.history(), k, v, 32**-0.5, layer.rope, tile=16)
    assert float((got - want).abs().max()) < TOL and float((lse - want_lse).abs().max()) < TOL


def _run(model, comp, ids, qids, impl: str, steps: int = 6) -> tuple[torch.Tensor, int]:
    with torch.inference_mode(), comp.session(model, qids) as s:
        interface.set_impl(model, impl)
        logits = [s.prefill(ids)]
        for _ in range(steps):
            logits.append(s.step(logits[-1].argmax(-1)[:, None]))
    return torch.stack(logits), s.cache.kv_bytes


@pytest.mark.parametrize("method", METHODS)
def test_every_method_equals_materialize_path(tiny, method: str) -> None:
    """Chunked prefill (question appended where the scorer wants it, propagation, drops) then decode: logits
    and stored bytes of the tiled path equal the materialize + softmax oracle's."""
    from kvcomp.experiment import build_parts

    model, _ = tiny
    comp = build_parts(compose([f"+experiment={method}", "compressor.chunk_size=96"])).compressor
    g = torch.Generator().manual_seed(0)
    ids, qids = torch.randint(3, 250, (1, 420), generator=g), torch.randint(3, 250, (1, 10), generator=g)
    want, want_bytes = _run(model, comp, ids, qids, "materialize")
    got, got_bytes = _run(model, comp, ids, qids, "tiled")
    assert float((got - want).abs().max()) < TOL and got_bytes == want_bytes


def test_installed_per_instance_and_removed(tiny) -> None:
    """The attention function is selected on this model only while the run is active."""
    from kvcomp.experiment import build_parts

    model, _ = tiny
    comp = build_parts(compose(["+experiment=int4"])).compressor
    before = model.config._attn_implementation
    with comp.session(model) as s:
        assert model.config._attn_implementation == interface.NAME and s.deferred and s.cache.run is s
    assert model.config._attn_implementation == before and not s.deferred


def test_no_full_precision_history(tiny, monkeypatch) -> None:
    """A packed run never materializes a layer nor dequantizes a whole packed block."""
    from kvcomp.experiment import build_parts
    def boom(*a, **k):
        raise AssertionError("whole-history materialize / whole-block dequantize called")

    model, _ = tiny
    comp = build_parts(compose(["+experiment=kvquant_stream", "compressor.chunk_size=64"])).compressor
    monkeypatch.setattr(CompressedLayer, "materialize", boom)
    monkeypatch.setattr(Packed, "dequantize", boom)
    ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), comp.session(model) as s:
        s.step(s.prefill(ids).argmax(-1)[:, None])
    assert s.cache.layers[0].seen == 301


@pytest.mark.slow  # a subprocess run
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_decode_picks_the_self_checked_triton_kernel() -> None:
    """Decode steps of a real run go through the Triton kernel where it is chosen (here: the interpreter, as
    CUDA would), after its first-use self-check, and give the tiled path's logits; a failing self-check
    falls back with one warning line."""
    code = (
        "import torch, warnings\n"
        "from conftest import compose\n"
        "from kvcomp.experiment import build_parts\n"
        "from kvcomp.cache import dispatch\n"
        "from kvcomp.kernels import triton_decode\n"
        "from kvcomp.model import load_model\n"
        "model, _ = load_model({'name': 'tiny_llama', 'source': 'random', 'device': 'cpu', 'dtype': 'float32'})\n"
        "comp = build_parts(compose(['+experiment=kvquant_stream', 'compressor.chunk_size=64'])).compressor\n"
        "ids = torch.randint(3, 250, (1, 150), generator=torch.Generator().manual_seed(0))\n"
        "calls = []\n"
        "orig = triton_decode.decode_attention_triton\n"
        "def spy(*a, **k):\n"
        "    calls.append(1)\n"
        "    return orig(*a, **k)\n"
        "triton_decode.decode_attention_triton = spy\n"
        "def run():\n"
        "    with torch.inference_mode(), comp.session(model) as s:\n"
        "        out = [s.prefill(ids)]\n"
        "        for _ in range(2):\n"
        "            out.append(s.step(out[-1].argmax(-1)[:, None]))\n"
        "    return torch.stack(out)\n"
        "dispatch.CHECK_CASES = ('uniform4', 'kvquant_stream')\n"
        "fused = run()\n"
        # the kernel ran in the 2 self-check cases, then in 2 decode steps x 4 layers
        "assert dispatch._CHECKED == {'cpu': True} and len(calls) == 2 + 2 * 4, (dispatch._CHECKED, calls)\n"
        "dispatch._CHECKED.clear(); calls.clear(); dispatch.TOLERANCE = -1.0\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    tiled = run()\n"
        "assert len(calls) == 2 and len([x for x in w if 'self-check' in str(x.message)]) == 1, calls\n"
        "print(float((fused - tiled).abs().max()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "KVCOMP_TRITON_DECODE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip().splitlines()[-1]) < TOL

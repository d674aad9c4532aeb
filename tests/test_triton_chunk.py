"""Triton path for prefill chunks (``kvcomp.kernels.triton_chunk``): a chunk of queries over the packed history
through the decode kernel, merged with the chunk's own causal attention, equals the tiled path and the
materialize oracle on every fused block type (Triton interpreter on CPU, subprocesses: ``TRITON_INTERPRET``
must be set before triton is imported); a real run's prefill chunks use it after its first-use self-check,
and a failing self-check falls back with one warning line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[triton]')")
TOL = 1e-4  # float32
#: (case, check_chunk kwargs, tolerance): packed 2/4/8 bit (both axes, groups), sparse outliers + an fp16 warm-up
#: block, channel splits + 8-bit sinks, keys stored post-RoPE (kivi); GQA 3:1 with 5 and 17 queries (1 and 4 row
#: tiles of 16), odd history lengths, programs running several splits, batch 2 without GQA at 128k positions,
#: fp16 (tensor-core dots)
CASES = [
    ("uniform2", {"n": 17, "t": 77}, TOL),
    ("uniform4", {"n": 5, "programs": 1}, TOL),  # one program per (KV head, row tile) runs the whole history
    ("uniform8", {"n": 17, "t": 53}, TOL),
    ("livekvquant4", {"n": 17, "t": 77, "programs": 16}, TOL),  # each program runs about half the splits
    ("livekvquant4", {"n": 5, "b": 2, "hq": 2, "start": 131000}, TOL),
    ("kvquant_stream", {"n": 9, "t": 91}, TOL),
    ("kivi2", {"n": 5, "t": 77}, TOL),
    ("uniform4", {"n": 9, "dtype": "float16"}, 2e-2),
]


def _interpret(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", **env}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # a subprocess run
@needs_triton
def test_chunk_kernel_equals_tiled_path_and_oracle() -> None:
    """Kernel vs ``chunk.chunk_attention`` and vs materialize + one float32 softmax (output and log-sum-exp), with
    16-token tiles, 32-token splits, 16-outlier steps and 16-row tiles (every loop runs more than once)."""
    code = (
        "import json, sys, torch\n"
        "from kvcomp.cache.selfcheck import check_chunk\n"
        "out = []\n"
        "for case, kw in json.loads(sys.argv[1]):\n"
        "    kw = {k: getattr(torch, v) if k == 'dtype' else v for k, v in kw.items()}\n"
        "    out.append(check_chunk(case, 'triton', ('tiled', 'materialize'), block_t=16, split=32, block_o=16,\n"
        "                           block_r=16, **kw))\n"
        "print(json.dumps(out))\n"
    )
    res = _interpret(code, json.dumps([(c, kw) for c, kw, _ in CASES]))
    assert res.returncode == 0, res.stderr[-3000:]
    errs = json.loads(res.stdout.strip().splitlines()[-1])
    report = {f"{c} {kw}": f"{e:.2e}" for (c, kw, _), e in zip(CASES, errs)}
    assert len(errs) == len(CASES) and all(e < tol for (_, _, tol), e in zip(CASES, errs)), \
        f"kernel vs tiled path / oracle max abs errors: {report}"


@pytest.mark.slow  # a subprocess run
@needs_triton
def test_prefill_chunks_pick_the_self_checked_kernel() -> None:
    """A real livekvquant run (random LLaMA, head dim 32 as the kernel needs; sparse outliers, fp16 warm-up block)
    whose prefill chunks go through the Triton path
    (here the interpreter, as CUDA would) after its self-check: the kernel reads packed history blocks and the
    logits equal the tiled path's; a failing self-check falls back with exactly one warning line."""
    code = (
        "import torch, warnings\n"
        "from conftest import compose\n"
        "from kvcomp.experiment import build_parts\n"
        "from kvcomp.cache import dispatch\n"
        "from kvcomp.kernels import triton_chunk, triton_decode\n"
        "from kvcomp.model.tiny import tiny_llama\n"
        "model, _ = tiny_llama(hidden_size=192, num_attention_heads=6, num_hidden_layers=2)  # head dim 32, GQA 3:1\n"
        "comp = build_parts(compose(['+experiment=livekvquant', 'compressor.chunk_size=48'])).compressor\n"
        "ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(0))\n"
        "fused = []\n"
        "def spy(q, layer, *a, **k):\n"
        "    other = triton_decode.fused_partials(q, layer, *a, **k)\n"
        "    fused.append(len(layer.k_blocks) - len(other))\n"
        "    return other\n"
        "triton_chunk.fused_partials = spy\n"
        "def run():\n"
        "    with torch.inference_mode(), comp.session(model) as s:\n"
        "        out = [s.prefill(ids)]\n"
        "        out.append(s.step(out[-1].argmax(-1)[:, None]))\n"
        "    return torch.stack(out)\n"
        "dispatch.CHECK_CASES = ('uniform4', 'livekvquant4')\n"
        "kernel = run()\n"
        "assert dispatch._CHECKED_CHUNK == {'cpu': True} and not dispatch._CHECKED, dispatch._CHECKED_CHUNK\n"
        "assert len(fused) > 2 and sum(fused[2:]) > 0, fused  # 2 self-check calls, then the run's chunks\n"
        "dispatch._CHECKED_CHUNK.clear(); fused.clear(); dispatch.TOLERANCE = -1.0\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    tiled = run()\n"
        "msgs = [str(x.message) for x in w if 'self-check' in str(x.message)]\n"
        "assert len(fused) == 2 and len(msgs) == 1 and 'prefill-chunk' in msgs[0], (fused, msgs)\n"
        "print(float((kernel - tiled).abs().max()))\n"
    )
    res = _interpret(code, KVCOMP_TRITON_CHUNK="1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip().splitlines()[-1]) < TOL


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@needs_triton
@pytest.mark.parametrize("case", ["uniform2", "uniform4", "uniform8", "kivi2", "livekvquant4", "kvquant_stream"])
def test_chunk_kernel_cuda(case: str) -> None:
    from kvcomp.cache.selfcheck import check_chunk

    err = check_chunk(case, "triton", ("tiled", "materialize"), device="cuda", hq=8, d=64, t=300, n=33)
    assert err < TOL, f"{case}: chunk kernel vs tiled path / oracle max abs error {err:.3e}"

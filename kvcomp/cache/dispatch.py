"""Which implementation attention over the packed cache uses, picked by device, checked on first use.

On CUDA (or on CPU under ``TRITON_INTERPRET=1`` with ``KVCOMP_TRITON_DECODE=1`` / ``KVCOMP_TRITON_CHUNK=1``, for
tests) a decode step (one query per sequence) goes through the fused Triton decode kernel (``triton_decode.py``)
and a prefill chunk (several queries) through the same kernel over its history (``triton_chunk.py``). The first
use of each on a device runs it against the tiled PyTorch path on small random caches of every fused block
layout (``selfcheck.check`` / ``selfcheck.check_chunk``); if it fails or disagrees, one warning line says so and
that device keeps the tiled PyTorch path (``chunk.py``) for that kind of call.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from kvcomp.kernels import triton_decode

#: max abs error (float32) the kernel may show against the reference in the self-check
TOLERANCE = 1e-3
#: block layouts the self-check covers (packed 2/3/4/8 bit, sparse outliers, channel splits + sinks)
CHECK_CASES = ("uniform2", "uniform4", "uniform8", "livekvquant4", "kvquant_stream")
#: the self-checks, ``"decode"`` / ``"chunk"`` -> fn(case, impl, device=..., ...) -> max abs error; ``selfcheck.py``
#: registers them when the cache package loads (it builds real cache layers, so this module cannot import it)
CHECKS: dict[str, Callable[..., float]] = {}
_CHECKED: dict[str, bool] = {}  # decode kernel, per device
_CHECKED_CHUNK: dict[str, bool] = {}  # prefill-chunk path, per device


def _wanted(query: torch.Tensor, opt_in: str) -> bool:
    # the query's device first: a CPU decode step asks this per layer, and ``available`` asks CUDA
    if not (query.is_cuda or (triton_decode.interpreting() and os.environ.get(opt_in) == "1")):
        return False
    return triton_decode.available()


def _first_use(done: dict[str, bool], query: torch.Tensor, what: str, err: Callable[[str], float]) -> bool:
    """Self-check ``what`` once per device (``err(device)``: its max abs error); warn once and say no if it fails."""
    key = str(query.device)
    if key not in done:
        try:
            e = err(key)
            ok = e < TOLERANCE
            reason = f"max abs error {e:.2e} vs the tiled reference"
        except Exception as ex:  # noqa: BLE001 - any failure of the kernel means: do not use it
            ok, reason = False, f"{type(ex).__name__}: {str(ex).splitlines()[0][:200] if str(ex) else ''}"
        if not ok:
            warnings.warn(f"kvcomp: the Triton {what} failed its self-check on {key} ({reason}); "
                          "attending with the tiled PyTorch path instead", RuntimeWarning, stacklevel=3)
        done[key] = ok
    return done[key]


def use_triton_decode(query: torch.Tensor) -> bool:
    """Whether this decode ``query`` ``[B, Hq, 1, D]`` goes to the Triton kernel (self-checked once per device)."""
    if query.shape[-2] != 1 or not _wanted(query, "KVCOMP_TRITON_DECODE"):
        return False
    return _first_use(_CHECKED, query, "decode kernel",
                      lambda dev: max(CHECKS["decode"](c, "triton", device=dev, hq=8) for c in CHECK_CASES))


def use_triton_chunk(query: torch.Tensor) -> bool:
    """Whether this prefill chunk ``query`` ``[B, Hq, n > 1, D]`` goes to the Triton path (self-checked once per
    device: 9 queries, GQA 3:1, against the tiled path)."""
    if query.shape[-2] < 2 or not _wanted(query, "KVCOMP_TRITON_CHUNK"):
        return False
    return _first_use(_CHECKED_CHUNK, query, "prefill-chunk kernel",
                      lambda dev: max(CHECKS["chunk"](c, "triton", device=dev) for c in CHECK_CASES))

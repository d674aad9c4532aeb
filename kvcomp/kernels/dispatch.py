"""Which implementation a decode step over the packed cache uses, picked by device, checked on first use.

On CUDA (or on CPU under ``TRITON_INTERPRET=1`` with ``KVCOMP_TRITON_DECODE=1``, for tests) a decode step
(one query per sequence) goes through the fused Triton decode kernel (``triton_decode.py``). The first use
on a device runs the kernel against the tiled PyTorch reference on small random caches of every fused block
layout (``selfcheck.check``); if it fails or disagrees, one warning line says so and that device keeps the
tiled PyTorch path. Prefill chunks always use the tiled path (``chunk.py``).
"""

from __future__ import annotations

import os
import warnings

import torch

from kvcomp.kernels import triton_decode

#: max abs error (float32) the kernel may show against the reference in the self-check
TOLERANCE = 1e-3
#: block layouts the self-check covers (packed 2/3/4/8 bit, sparse outliers, channel splits + sinks)
CHECK_CASES = ("uniform2", "uniform4", "uniform8", "livekvquant4", "kvquant_stream")
_CHECKED: dict[str, bool] = {}


def _wanted(query: torch.Tensor) -> bool:
    if query.shape[-2] != 1 or not triton_decode.available():
        return False
    return query.is_cuda or (triton_decode.interpreting() and os.environ.get("KVCOMP_TRITON_DECODE") == "1")


def use_triton_decode(query: torch.Tensor) -> bool:
    """Whether this decode ``query`` ``[B, Hq, 1, D]`` goes to the Triton kernel (self-checked once per device)."""
    if not _wanted(query):
        return False
    key = str(query.device)
    if key not in _CHECKED:
        from kvcomp.kernels.selfcheck import check

        try:
            err = max(check(c, "triton", device=key, hq=8) for c in CHECK_CASES)
            ok = err < TOLERANCE
            reason = f"max abs error {err:.2e} vs the tiled reference"
        except Exception as e:  # noqa: BLE001 - any failure of the kernel means: do not use it
            ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if not ok:
            warnings.warn(f"kvcomp: the Triton decode kernel failed its self-check on {key} ({reason}); "
                          "decoding with the tiled PyTorch path instead", RuntimeWarning, stacklevel=2)
        _CHECKED[key] = ok
    return _CHECKED[key]

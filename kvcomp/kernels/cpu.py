"""The compiled CPU kernels (``cpu_src.py``), built once on first use and cached by torch.

``ops()`` returns the extension module, or None when kernels are off (``KVCOMP_CPU_KERNELS=0``) or cannot be
built (no C++ compiler, no ninja): then one warning line says so and every caller keeps its plain-torch path,
which is also the oracle the tests hold the kernels to. The build goes to torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that carries a hash of the
source, the flags, this CPU's instruction-set flags and the torch it builds against, so a changed source, another
machine or another venv builds its own.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from typing import Any

import torch

from kvcomp.kernels.cpu_src import FUNCTIONS, SOURCE

#: (cos, sin) float32 ``[n, D]`` of a tile's tokens for split-half RoPE, or None (no rotation)
Rot = "tuple[torch.Tensor, torch.Tensor] | None"
#: "no rotation" for the compiled kernels (an empty cos/sin)
NO_ROT = torch.empty(0)

FLAGS = ["-O3", "-march=native", "-fopenmp"]
_STATE: dict[str, Any] = {}


def enabled() -> bool:
    """Whether compiled kernels are wanted (``KVCOMP_CPU_KERNELS`` unset or not ``0``)."""
    return os.environ.get("KVCOMP_CPU_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build() -> Any:
    from torch.utils.cpp_extension import load_inline

    # the torch it compiles against (its include paths are in the build file) is part of the name: two venvs
    # sharing the extension cache each keep their own build instead of rebuilding over each other's
    torch_dir = os.path.dirname(torch.__file__)
    key = "\n".join([SOURCE, *FLAGS, _cpu_flags(), torch.__version__, torch_dir])
    tag = hashlib.sha1(key.encode()).hexdigest()[:12]
    return load_inline(name=f"kvcomp_cpu_{tag}", cpp_sources=SOURCE, functions=FUNCTIONS,
                       extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], verbose=False)


def ops() -> Any | None:
    """The compiled module, or None (kernels off, or the build failed: warned once)."""
    if not enabled():
        return None
    if "mod" not in _STATE:
        try:
            _STATE["mod"] = _build()
        except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: the torch path runs
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            warnings.warn(f"kvcomp: the compiled CPU kernels are unavailable ({type(e).__name__}: {first}); "
                          "using the plain-torch path", RuntimeWarning, stacklevel=2)
            _STATE["mod"] = None
    return _STATE["mod"]


def on(out: torch.Tensor) -> Any | None:
    """The compiled module when ``out`` is on the CPU and kernels are built, else None."""
    return ops() if out.device.type == "cpu" else None


def rotate_rows(out: torch.Tensor, rot: Any) -> torch.Tensor:
    """Split-half RoPE of float32 ``out`` ``[B, H, n, D]`` in place with ``rot`` = (cos, sin) ``[n, D]`` (None:
    nothing), plain torch: ``x1*cos - x2*sin | x2*cos + x1*sin``."""
    if rot is None:
        return out
    cos, sin = rot
    h = out.shape[-1] // 2
    x1, x2 = out[..., :h].clone(), out[..., h:].clone()
    torch.mul(x1, cos[:, :h], out=out[..., :h]).addcmul_(x2, sin[:, :h], value=-1)
    torch.mul(x2, cos[:, h:], out=out[..., h:]).addcmul_(x1, sin[:, h:])
    return out


def rope_tile(out: torch.Tensor, rot: Any) -> torch.Tensor:
    """``rotate_rows`` through the compiled kernel when there is one."""
    mod = on(out) if rot is not None else None
    if mod is None:
        return rotate_rows(out, rot)
    mod.rope_tile(out, *rot)
    return out


def dense_tile(data: torch.Tensor, t0: int, t1: int, out: torch.Tensor, rot: Any = None) -> torch.Tensor:
    """Tokens ``[t0, t1)`` of a full-precision ``data`` ``[B, H, T, D]`` (any float dtype) into float32 ``out``
    ``[B, H, t1 - t0, D]`` (last dim contiguous), rotated by ``rot`` when given. Returns ``out``."""
    mod = on(out)
    if mod is None:
        out.copy_(data[..., t0:t1, :])
        return rotate_rows(out, rot)
    mod.dense_tile(data, t0, out, *(rot or (NO_ROT, NO_ROT)))
    return out


# -- meta rows of the decode kernel's sources (``cpu_src.py`` ``Dec``): 16 int64, a split 48 ---------------------
META = 48
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dense_meta(x: torch.Tensor, keep: list[torch.Tensor]) -> list[int] | None:
    """Meta row of a full-precision ``x`` ``[B, H, T, D]`` (float32 / fp16 / bf16; copied when its last dim is
    strided; the copy goes to ``keep``), or None for another dtype."""
    if x.dtype not in DTYPES:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
        keep.append(x)
    b, h, t, d = x.shape
    row = [0, x.data_ptr(), DTYPES[x.dtype], x.stride(0), x.stride(1), x.stride(2), h, d]
    return row + [0] * (META - len(row))


def packed_meta(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                shape: tuple[int, int, int, int], token_axis: bool, group: int) -> list[int] | None:
    """Meta row of bit-packed codes (``kvcomp.cache.quant.Packed`` layout) or None where the kernel cannot read it."""
    if bits not in (2, 3, 4, 8) or scale.dtype not in DTYPES or not (scale.is_contiguous() and zero.is_contiguous()):
        return None
    b, h, t, d = shape
    ng = scale.numel() // (b * h * (t if token_axis else d))
    row = [1, codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), DTYPES[scale.dtype], bits, h, t, d,
           int(token_axis), group, ng]
    return row + [0] * (META - len(row))


def split_runs(colmap: torch.Tensor) -> torch.Tensor:
    """int32 ``[n_runs, 4]`` (part 0 normal / 1 special, first output column, first part column, length): the runs of
    adjacent columns of a channel split's column map ``[H*D]`` (``ChannelSplit.column_map``), so the kernel copies
    a few runs per row instead of gathering every column."""
    cm = colmap.to(torch.int64)
    part = (cm < 0).to(torch.int64)
    src = torch.where(cm < 0, -cm - 1, cm)
    start = torch.ones_like(cm, dtype=torch.bool)
    start[1:] = (part[1:] != part[:-1]) | (src[1:] != src[:-1] + 1)
    first = start.nonzero().squeeze(1)
    length = torch.diff(first, append=torch.tensor([cm.numel()], device=cm.device))
    return torch.stack([part[first], first, src[first], length], dim=1).to(torch.int32).contiguous()


def split_meta(colmap: torch.Tensor, runs: torch.Tensor, h: int, d: int, normal: list[int] | None,
               special: list[int] | None) -> list[int] | None:
    """Meta row of a channel split: int32 column map ``[H*D]``, its runs (``split_runs``) and its two parts'
    (unsplit) rows."""
    if normal is None or special is None or normal[0] >= 2 or special[0] >= 2:
        return None
    return [2, colmap.data_ptr(), h, d, runs.data_ptr(), runs.shape[0]] + [0] * 10 + normal[:16] + special[:16]


def sparse_meta(base: list[int] | None, index: torch.Tensor, values: torch.Tensor,
                shape: tuple[int, int, int, int], keep: list[torch.Tensor]) -> list[int] | None:
    """Meta row of a dense-and-sparse block: its (unsplit, unsparse) base's row and its outliers (sorted int32 flat
    indices into ``[B, H, T, D]``, values; the kernel finds each row's first outlier itself, so nothing is built
    per step; contiguous copies, where needed, go to ``keep``)."""
    if base is None or base[0] >= 2 or values.dtype not in DTYPES or index.dtype != torch.int32:
        return None
    _, h, t, d = shape
    ix, vals = index.contiguous(), values.contiguous()
    keep += [x for x, y in ((ix, index), (vals, values)) if x is not y]
    return [3, int(ix.numel()), ix.data_ptr(), vals.data_ptr(), DTYPES[values.dtype], h, d, t,
            *([0] * 8), *base[:16], *([0] * 16)]

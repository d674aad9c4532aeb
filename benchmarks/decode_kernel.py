"""The compiled CPU decode kernel alone, on one layer of SmolLM2-135M's shape, against SDPA over a full fp32 cache.

    python -m benchmarks.decode_kernel [--tokens 8192] [--repeats 10] [--cold]

A layer (3 KV heads, D = 64, 512-token blocks of random data through the real quantizers,
``kvcomp.cache.selfcheck.build_layer``) is attended by one decode query of 9 heads three ways:
``kvcomp.kernels.decode.decode_attention_cpu`` (one kernel call per segment), ``decode_layer_cpu`` (one call per
layer, with its Python: plan kept on the store, tail, table) and the layer call alone (``decode_layer`` with its
arguments built beforehand: the kernel's own time); the full cache is ``scaled_dot_product_attention`` over fp32 K/V
with the KV heads repeated, as the model's sdpa path does. Torch at 1 thread; the clock is this thread's CPU time
(robust to other jobs on a shared machine), min of ``--repeats``. ``--cold``: a 256 MiB buffer is written before
every timed call (not timed), so the call reads its layer from memory as inside the model, where the weights of the
other layers pass through the caches between two calls; the median is printed. One line per row.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

ROWS = {"int4": {"name": "uniform", "key_bits": 4, "value_bits": 4, "key_group_size": 32, "value_group_size": 32},
        "kvquant_stream": {"name": "kvquant_stream"}, "livekvquant": {"name": "livekvquant"}}


def cpu_ms(f: Callable[[], object], repeats: int, flush: torch.Tensor | None = None) -> float:
    """Min of ``repeats`` thread-CPU times of ``f`` in ms; with ``flush`` (written before each call), the median."""
    f()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.add_(1.0)
        t0 = time.thread_time()
        f()
        times.append(1000 * (time.thread_time() - t0))
    return min(times) if flush is None else sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    from kvcomp.cache.selfcheck import build_layer
    from kvcomp.kernels import cpu
    from kvcomp.kernels.decode import NO_POS, decode_attention_cpu, decode_layer_cpu, half_table, layer_plan

    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_kernel", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cold", action="store_true", help="caches flushed before each call (median)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    flush = torch.ones(64 << 20) if a.cold else None
    how = "cold, median" if a.cold else "min"
    g = torch.Generator().manual_seed(0)
    q, nk = torch.randn(1, 9, 1, 64, generator=g), torch.randn(1, 3, 1, 64, generator=g)
    top = a.tokens + 1
    for name, cfg in ROWS.items():
        layer = build_layer(cfg, b=1, hkv=3, d=64, t=a.tokens, chunk=512, decode=0)
        hist = layer.history()
        ms = cpu_ms(lambda h=hist, r=layer.rope: decode_attention_cpu(q, h, nk, nk, 0.125, r, top=top), a.repeats,
                    flush)
        print(f"{name}: decode kernel {ms:.2f} ms per layer-step, one call per segment ({len(hist.k_blocks)} "
              f"segments, {a.tokens} tokens, 1 thread, CPU time, {how})")
        ms = cpu_ms(lambda h=hist, r=layer.rope: decode_layer_cpu(q, h, nk, nk, 0.125, r, top=top), a.repeats, flush)
        print(f"{name}: decode kernel {ms:.2f} ms per layer-step, one call per layer, with its Python "
              f"({a.tokens} tokens, 1 thread, CPU time, {how})")
        plan, table = layer_plan(hist, layer.rope, (1, 3, 64)), half_table(layer.rope, top)
        args = (q.reshape(1, 3, 3, 64), 0.125, plan.kmeta, plan.vmeta, plan.seg, [nk, nk, NO_POS], *table)
        ms = cpu_ms(lambda x=args: cpu.ops().decode_layer(*x), a.repeats, flush)
        print(f"{name}: decode kernel {ms:.2f} ms per layer-step, the layer call alone ({a.tokens} tokens, "
              f"1 thread, CPU time, {how})")
    k, v = torch.randn(1, 9, a.tokens, 64), torch.randn(1, 9, a.tokens, 64)
    ms = cpu_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), a.repeats, flush)
    print(f"full cache: sdpa {ms:.2f} ms per layer-step ({a.tokens} tokens, 1 thread, CPU time, {how})")


if __name__ == "__main__":
    main()

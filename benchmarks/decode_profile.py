"""Where a decode step's time goes: cProfile of decode steps after a prefill, SmolLM2-135M, 1 torch thread.

    python -m benchmarks.decode_profile [--tokens 4096] [--steps 16] [--top 12] [--split] int4 full_cache ...

For each experiment: a chunked prefill of ``--tokens`` random token ids (seed 0), one untimed decode step, then
``--steps`` greedy decode steps under cProfile; prints the decode ms/token (thread CPU time) and the functions
with the largest own time (the compiled kernel, ``torch._C._nn.linear``, sdpa, ``torch.cat`` ...).
``--split``: no cProfile; three untimed steps, then per layer-step the thread CPU time of the compressed layer's
attention (``CompressedLayer.attend``: history read, kernel, storing the step's token), of the compiled decode
kernel calls inside it (every ``decode_*`` entry of the extension) and the rest (the Python around the kernel).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def split_timer() -> Iterator[dict[str, float]]:
    """Thread CPU time of ``CompressedLayer.attend`` and of the compiled decode kernel calls inside it, summed while
    the context is open (the two wrapped for its duration, restored after)."""
    from kvcomp.cache.layer import CompressedLayer
    from kvcomp.kernels import cpu

    acc = {"attend": 0.0, "kernel": 0.0, "calls": 0.0}
    attend, mod = CompressedLayer.attend, cpu.ops()

    def timed(f: Callable[..., Any], key: str) -> Callable[..., Any]:
        def g(*args: Any, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return f(*args, **kw)
            finally:
                acc[key] += time.thread_time() - t0
                acc["calls"] += key == "attend"
        return g

    class Timed:  # the extension module with its decode entries timed
        def __getattr__(self, name: str) -> Any:
            f = getattr(mod, name)
            return timed(f, "kernel") if name.startswith("decode_") else f

    CompressedLayer.attend = timed(attend, "attend")
    if mod is not None:
        cpu._STATE["mod"] = Timed()
    try:
        yield acc
    finally:
        CompressedLayer.attend = attend
        if mod is not None:
            cpu._STATE["mod"] = mod


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir

    from benchmarks.common import REPO
    from kvcomp.api import build_compressor
    from kvcomp.model import load_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_profile", description=__doc__.splitlines()[0])
    p.add_argument("methods", nargs="+")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--split", action="store_true", help="attention / kernel / the rest per layer-step, no cProfile")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        model, _ = load_model(dict(compose(config_name="config").model))
    ids = torch.randint(100, 20000, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    for method in a.methods:
        with torch.inference_mode(), build_compressor(method).session(model) as sess:
            nxt = sess.prefill(ids).argmax(-1)
            nxt = sess.step(nxt[:, None]).argmax(-1)
            if a.split:
                for _ in range(2):
                    nxt = sess.step(nxt[:, None]).argmax(-1)
                with split_timer() as acc:
                    t0 = time.thread_time()
                    for _ in range(a.steps):
                        nxt = sess.step(nxt[:, None]).argmax(-1)
                    ms = 1000 * (time.thread_time() - t0) / a.steps
                n = max(acc["calls"], 1)
                att, ker = 1000 * acc["attend"] / n, 1000 * acc["kernel"] / n
                print(f"{method}: decode {ms:.2f} ms/token; per layer-step: attention {att:.3f} ms, kernel {ker:.3f} "
                      f"ms, the rest {att - ker:.3f} ms ({int(n)} layer-steps, {a.tokens} tokens, {a.steps} steps, "
                      "1 thread, CPU time)", flush=True)
                continue
            prof = cProfile.Profile()
            t0 = time.thread_time()
            prof.enable()
            for _ in range(a.steps):
                nxt = sess.step(nxt[:, None]).argmax(-1)
            prof.disable()
            ms = 1000 * (time.thread_time() - t0) / a.steps
        print(f"{method}: decode {ms:.1f} ms/token ({a.tokens} tokens, {a.steps} steps, 1 thread, CPU time)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()

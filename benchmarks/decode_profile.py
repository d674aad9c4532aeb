"""Where a decode step's time goes: cProfile of decode steps after a prefill, SmolLM2-135M, 1 torch thread.

    python -m benchmarks.decode_profile [--tokens 4096] [--steps 16] [--top 12] int4 full_cache ...

For each experiment: a chunked prefill of ``--tokens`` random token ids (seed 0), one untimed decode step, then
``--steps`` greedy decode steps under cProfile; prints the decode ms/token (thread CPU time) and the functions
with the largest own time (the compiled kernel, ``torch._C._nn.linear``, sdpa, ``torch.cat`` ...).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


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
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        model, _ = load_model(dict(compose(config_name="config").model))
    ids = torch.randint(100, 20000, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    for method in a.methods:
        with torch.inference_mode(), build_compressor(method).session(model) as sess:
            nxt = sess.prefill(ids).argmax(-1)
            nxt = sess.step(nxt[:, None]).argmax(-1)
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

"""Logits, generated tokens and compression stats of several methods, saved for a before/after comparison of a change.

    python -m benchmarks.decode_logits --out /tmp/before.pt            # on the code before the change
    python -m benchmarks.decode_logits --out /tmp/after.pt             # on the code after it
    python -m benchmarks.decode_logits --compare /tmp/before.pt /tmp/after.pt

SmolLM2-135M, 1 torch thread: ``--tokens`` random token ids (seed 0) prefilled with each preset's chunking, then
``--steps`` greedy decode steps; per method the last-position logits of the prefill and of every step, the tokens
and the numeric stats of ``Session.stats()``. ``--compare`` prints per method the largest logit difference of the
prefill and of the decode steps, the logit magnitude, and whether tokens and stats are equal.
"""

from __future__ import annotations

import argparse

import torch

METHODS = ["int4", "int8", "kivi", "kvquant_stream", "livekvquant", "prompt_guided", "prompt_guided_end", "h2o",
           "snapkv", "streaming_llm"]


def run(methods: list[str], tokens: int, steps: int) -> dict[str, tuple[torch.Tensor, list[int], dict]]:
    from hydra import compose, initialize_config_dir

    from benchmarks.common import REPO
    from kvcomp.api import build_compressor
    from kvcomp.model import load_model

    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        model, _ = load_model(dict(compose(config_name="config").model))
    ids = torch.randint(100, 20000, (1, tokens), generator=torch.Generator().manual_seed(0))
    res = {}
    for method in methods:
        with torch.inference_mode(), build_compressor(method).session(model) as sess:
            logits = [sess.prefill(ids).clone()]
            for _ in range(steps):
                logits.append(sess.step(logits[-1].argmax(-1)[:, None]).clone())
            stats = {k: v for k, v in sess.stats().items() if isinstance(v, (int, float, str))}
        res[method] = (torch.stack(logits), [int(x.argmax(-1)) for x in logits], stats)
        print(f"{method}: tokens {res[method][1]}", flush=True)
    return res


def compare(a: dict, b: dict) -> None:
    for method in a:
        (la, ta, sa), (lb, tb, sb) = a[method], b[method]
        d = (la - lb).abs().flatten(1).amax(1)
        print(f"{method}: prefill max |logit diff| {d[0].item():.3g}, decode steps {d[1:].max().item():.3g} "
              f"(n = {len(d) - 1}), logit magnitude {la.abs().max().item():.1f}, tokens equal {ta == tb}, "
              f"stats equal {sa == sb}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_logits", description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--compare", nargs=2)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--tokens", type=int, default=1300)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args(argv)
    if a.compare:
        compare(*(torch.load(f) for f in a.compare))
    elif a.out:
        torch.save(run(a.methods, a.tokens, a.steps), a.out)
    else:
        p.error("--out or --compare")


if __name__ == "__main__":
    main()

"""``python -m kvcomp.selfcheck [--impl reference|triton] [--device cpu|cuda] [--cases a,b] [--chunk N]``: the
numerical self-check of the attention paths over the compressed cache (``kvcomp.cache.selfcheck``), one JSON
object ``{case: max_abs_error}``."""

from __future__ import annotations

import argparse
import json

import torch

from kvcomp.cache.selfcheck import CASES, check, check_chunk, compile_for_cuda


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="numerical self-check of the attention paths over the compressed cache")
    ap.add_argument("--impl", default="reference", choices=["reference", "triton"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--hq", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="absolute position of the first token")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--kernel", default="", help="kernel sizes for --impl triton, e.g. block_t=16,split=32")
    ap.add_argument("--chunk", type=int, default=0, help="queries of a prefill chunk (0: a decode step)")
    ap.add_argument("--compile", type=int, default=0, help="only compile the kernel for this sm (e.g. 90), no GPU")
    args = ap.parse_args(argv)
    if args.compile:
        print(json.dumps(compile_for_cuda(args.compile)))
        return
    kw = {k: int(v) for k, v in (x.split("=") for x in args.kernel.split(",") if x)}
    dt = getattr(torch, args.dtype)
    if args.chunk:
        impl, against = ("triton", ("tiled", "materialize")) if args.impl == "triton" else ("tiled", ("materialize",))
        out = {c: check_chunk(c, impl, against, args.device, b=args.batch, hq=args.hq, n=args.chunk, dtype=dt,
                              start=args.start, **kw) for c in args.cases.split(",")}
    else:
        out = {c: check(c, args.impl, args.device, b=args.batch, hq=args.hq, dtype=dt, start=args.start, **kw)
               for c in args.cases.split(",")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

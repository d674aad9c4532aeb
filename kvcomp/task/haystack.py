"""Haystack text for the offline long-context tasks: WikiText-2 raw test, deterministic by seed."""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

from kvcomp.data import wikitext2_text


@lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    """Non-heading paragraphs of the WikiText-2 test file (whitespace-normalised)."""
    out = []
    for line in wikitext2_text().split("\n"):
        s = line.strip()
        if len(s) > 80 and not s.startswith("="):
            out.append(" ".join(s.split()))
    return tuple(out)


def haystack(tokenizer: Any, n_tokens: int, rng: random.Random) -> list[str]:
    """Consecutive paragraphs from a random start whose total length is about ``n_tokens`` tokens."""
    paras = _paragraphs()
    i = rng.randrange(len(paras))
    out: list[str] = []
    total = 0
    while total < n_tokens:
        p = paras[i % len(paras)]
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if total + len(ids) > n_tokens:  # cut the last paragraph at a token boundary
            p = tokenizer.decode(ids[: n_tokens - total])
            ids = ids[: n_tokens - total]
        out.append(p)
        total += len(ids)
        i += 1
    return out


def insert_at_depth(paragraphs: list[str], needle: str, depth: float) -> str:
    """Join paragraphs with the needle inserted as its own paragraph at relative ``depth`` (0..1)."""
    k = round(depth * len(paragraphs))
    return "\n".join([*paragraphs[:k], needle, *paragraphs[k:]])

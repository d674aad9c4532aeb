"""Compressor interface: owns the cache for one sequence, the prefill chunking and the hooks.

A run does, per sample::

    cache = compressor.new_cache(model)
    with compressor.attach(model, cache, question_ids):
        generation = greedy_generate(model, cache, ids, ..., chunk_size=compressor.chunk_size)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvcomp.fields import param


@dataclass
class Compressor:
    """``chunk_size``: prefill tokens per forward pass (0 = whole prompt at once)."""

    chunk_size: int = param(0, ge=0)

    def new_cache(self, model: Any) -> Any:
        raise NotImplementedError

    @contextmanager
    def attach(self, model: Any, cache: Any, question_ids: Any = None) -> Iterator[None]:
        """Install per-sequence hooks for the duration of the block (none in the base class)."""
        yield

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
from kvcomp.model import arch


@dataclass
class Compressor:
    """``chunk_size``: prefill tokens per forward pass (0 = whole prompt at once)."""

    chunk_size: int = param(0, ge=0)

    def new_cache(self, model: Any) -> Any:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Run settings reported in metrics.json (e.g. when the question was known); none by default."""
        return {}

    def needs(self, n_layers: int) -> arch.Needs:
        """What this compressor needs from a model of ``n_layers`` layers (nothing: a plain cache)."""
        return arch.Needs()

    def check(self, model: Any) -> None:
        """Refuse, before any prefill, a model this compressor cannot run exactly (ConfigError, one line)."""
        arch.check(model, self.needs(arch.text_config(model).num_hidden_layers))

    @contextmanager
    def attach(self, model: Any, cache: Any, question_ids: Any = None) -> Iterator[None]:
        """Install per-sequence hooks for the duration of the block (none in the base class)."""
        yield

"""``compressor=unified``: compressed cache + chunked prefill, composed from pluggable components.

quantizer (how tokens are stored) + propagator (which tokens reach later layers) — each switchable off
with ``none`` — so an ablation is a pure config change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvcomp.cache import CompressedCache
from kvcomp.compressor.base import Compressor
from kvcomp.registry import COMPRESSORS


@COMPRESSORS.register("unified")
@dataclass
class Unified(Compressor):
    """``quantizer``/``propagator`` are built from their own config groups and passed in by the run."""

    chunk_size: int = 512
    quantizer: Any = None
    propagator: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantizer is None:
            from kvcomp.quantizer.none import NoQuantizer

            self.quantizer = NoQuantizer()

    def new_cache(self, model: Any) -> CompressedCache:
        return CompressedCache(model, self.quantizer)

    @contextmanager
    def attach(self, model: Any, cache: Any, question_ids: Any = None) -> Iterator[None]:
        handles = self.propagator.install(model, cache, question_ids) if self.propagator else []
        try:
            yield
        finally:
            for h in handles:
                h.remove()

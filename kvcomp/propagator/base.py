"""Propagator interface: decides which tokens' hidden states go on to later layers during prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Propagator:
    """Stateless; ``install`` registers forward hooks on the model for one sequence and returns handles."""

    def install(self, model: Any, cache: Any, question_ids: Any = None) -> list[Any]:
        """Register hooks (removed by the compressor on exit). The base propagates every token."""
        return []

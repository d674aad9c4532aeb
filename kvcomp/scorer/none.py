"""``scorer=none``: no importance scores (every token is treated alike)."""

from __future__ import annotations

from dataclasses import dataclass

from kvcomp.registry import SCORERS
from kvcomp.scorer.base import Scorer


@SCORERS.register("none")
@dataclass
class NoScorer(Scorer):
    """Marker: the compressor skips scoring entirely."""

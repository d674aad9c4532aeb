"""``propagation=layer_ratio``: keep 80 % / 60 % / 40 % of the tokens after early / middle / late layers.

Layer ``l`` of ``L`` is early when ``l < early_frac * L``, late when ``l >= (1 - late_frac) * L``, middle
otherwise; the hidden states leaving it keep ``early``/``middle``/``late`` of the forward's tokens,
chosen by importance scores (question and last tokens always kept, positions preserved). With the stage
schedule the scores are the scorer's with the prompt end's queries, summed over the stage's layers
(``score_layers: stage``, default: one layer's question attention at layer 0 or 9 is a noisy ranking; measured
in docs/propagation.md) or the selection layer's alone (``point``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvcomp.errors import ConfigError
from kvcomp.fields import param
from kvcomp.propagator.base import Propagator
from kvcomp.registry import PROPAGATORS


@PROPAGATORS.register("layer_ratio")
@dataclass
class LayerRatio(Propagator):
    """Ratios by depth band (defaults 0.8 / 0.6 / 0.4 over the first 30 % / middle / last 30 %)."""

    early: float = param(0.8, ge=0, le=1)
    middle: float = param(0.6, ge=0, le=1)
    late: float = param(0.4, ge=0, le=1)
    early_frac: float = param(0.3, ge=0, le=1)
    late_frac: float = param(0.3, ge=0, le=1)
    score_layers: Literal["point", "stage"] = "stage"  # stage schedule: scores summed over each stage's layers

    def __post_init__(self) -> None:
        if self.early_frac + self.late_frac > 1.0:
            raise ConfigError("propagation.early_frac + propagation.late_frac must be <= 1")

    def ratio(self, layer_idx: int, n_layers: int) -> float:
        if layer_idx < self.early_frac * n_layers:
            return float(self.early)
        if layer_idx >= (1.0 - self.late_frac) * n_layers:
            return float(self.late)
        return float(self.middle)

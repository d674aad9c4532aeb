"""``propagation=fastkv_tsp``: FastKV's token-selective propagation (Jo et al., 2025).

Layers before ``tsp_layer`` process every token; the hidden states leaving ``tsp_layer`` keep only the
top ``tsp_rate`` of the tokens by that layer's importance scores, and every later layer computes and caches
only those. ``tsp_layer: null`` = the middle layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcomp.errors import ConfigError
from kvcomp.fields import param
from kvcomp.propagator.base import Propagator
from kvcomp.registry import PROPAGATORS


@PROPAGATORS.register("fastkv_tsp")
@dataclass
class FastKVTSP(Propagator):
    """One selection layer ``tsp_layer`` keeping ``tsp_rate`` of the tokens."""

    tsp_layer: int | None = param(None, ge=0)
    tsp_rate: float = param(0.2, gt=0, le=1)

    def ratio(self, layer_idx: int, n_layers: int) -> float:
        tsp = n_layers // 2 if self.tsp_layer is None else self.tsp_layer
        if tsp >= n_layers - 1 and self.tsp_layer is not None:
            raise ConfigError(f"propagation.tsp_layer={self.tsp_layer} must be < {n_layers - 1} for this model")
        return float(self.tsp_rate) if layer_idx >= tsp else 1.0

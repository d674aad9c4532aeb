"""``propagation=none``: every token's hidden state reaches every layer (no selective propagation)."""

from __future__ import annotations

from dataclasses import dataclass

from kvcomp.propagator.base import Propagator
from kvcomp.registry import PROPAGATORS


@PROPAGATORS.register("none")
@dataclass
class NoPropagation(Propagator):
    """Full propagation."""

"""``compressor=none``: the full-precision baseline, a plain transformers ``DynamicCache``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import DynamicCache

from kvcomp.compressor.base import Compressor
from kvcomp.errors import ConfigError
from kvcomp.registry import COMPRESSORS


@COMPRESSORS.register("none")
@dataclass
class FullCache(Compressor):
    """No compression: every token of every layer kept in the model dtype (unchunked by default)."""

    quantizer: Any = None
    propagator: Any = None

    def __post_init__(self) -> None:
        for key, comp in (("quantizer", self.quantizer), ("propagation", self.propagator)):
            name = getattr(comp, "registry_name", "none")
            if name != "none":
                raise ConfigError(
                    f"{key}={name} has no effect with compressor=none; use compressor=unified "
                    f"(or an experiment such as +experiment={name})"
                )

    def new_cache(self, model: Any) -> Any:
        return DynamicCache(config=model.config)

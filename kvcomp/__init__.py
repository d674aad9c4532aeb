"""kvcomp: config-driven experiments for real-time prefill KV-cache compression."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["compress", "methods"]


def __getattr__(name: str) -> Any:
    """Lazy exports: ``kvcomp.compress`` / ``kvcomp.methods`` import torch and Hydra only when first used."""
    if name in __all__:
        from kvcomp import api

        return getattr(api, name)
    raise AttributeError(f"module 'kvcomp' has no attribute {name!r}")

"""The model's attention reads the compressed cache directly: an ``AttentionInterface`` function, selected
per model instance while a compressed run is active.

``use_packed_attention(model, session)`` registers ``kvcomp_packed`` with transformers' attention-function
registry (once; a registry entry, not a patch), switches *this* model to it with
``model.set_attn_implementation`` and switches it back on exit. While active, the cache's layers defer
storing a forward's tokens: ``update`` returns the new K/V untouched, then the attention function asks the
layer (``CompressedLayer.attend``) for the attention over its history + those tokens, which also stores them.
No mask is built for this implementation (transformers skips mask creation for it): causality among the
new tokens and "all history visible" are part of the computation.

``impl``: ``"tiled"`` (default: packed blocks read tile by tile, ``kernels/chunk.py``) or
``"materialize"`` (the test oracle: dequantize the whole history, then one softmax).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

NAME = "kvcomp_packed"
IMPLS = ("tiled", "materialize")
_BOUND: dict[int, tuple[Any, str]] = {}  # id(model config) -> (cache, impl)
_REGISTERED = False


def packed_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: ``query`` ``[B, Hq, n, D]``, ``key``/``value`` ``[B, Hkv, n, D]``
    (this forward's tokens, as the cache's ``update`` returned them). Returns ``[B, n, Hq, D]``, no weights."""
    bound = _BOUND.get(id(module.config))
    if bound is None:
        raise RuntimeError(f"attn_implementation={NAME} is only valid inside a kvcomp compressed run")
    cache, impl = bound
    layer = cache.layers[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{type(module).__name__} uses attention sinks (s_aux), which kvcomp's attention "
                                  "does not implement; use compressor=none with this model")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap")
    if window or softcap:
        impl = "materialize"  # the oracle path applies windows by position and logit soft-capping
    out = layer.attend(query, key, value, scale, impl=impl, window=window, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, packed_attention_forward)
        _REGISTERED = True


@contextmanager
def use_packed_attention(model: Any, run: Any, impl: str = "tiled") -> Iterator[None]:
    """Route ``model``'s attention through ``run.cache`` (a ``CompressedCache`` bound to the session ``run``)
    for the duration of the block."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {', '.join(IMPLS)}")
    _register()
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    keys = {id(cfg), id(text)}  # attention modules hold the (text) config
    if keys & _BOUND.keys():
        raise RuntimeError("this model is already inside a kvcomp compressed run")
    old = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:  # transformers only warns when a model cannot switch
        from kvcomp.errors import ConfigError

        raise ConfigError(f"{type(model).__name__}: its attention does not go through transformers' attention-function "
                          "registry, which kvcomp's compressed cache is read through; use compressor=none")
    for key in keys:
        _BOUND[key] = (run.cache, impl)
    run.deferred = True
    try:
        yield
    finally:
        run.deferred = False
        for key in keys:
            _BOUND.pop(key, None)
        model.set_attn_implementation(old)

def set_impl(model: Any, impl: str) -> None:
    """Switch an active run on ``model`` to ``impl`` (tests compare ``"tiled"`` with the ``"materialize"`` oracle)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {', '.join(IMPLS)}")
    cache, _ = _BOUND[id(model.config)]
    for key, (c, _) in list(_BOUND.items()):
        if c is cache:
            _BOUND[key] = (cache, impl)

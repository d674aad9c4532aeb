"""``CompressedCache``: a transformers ``Cache`` whose layers hold bit-packed K/V (see ``layer.py``)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from transformers.cache_utils import Cache

from kvcomp.cache.accounting import reserved_bytes
from kvcomp.cache.layer import CompressedLayer
from kvcomp.model.rope import Rope

if TYPE_CHECKING:
    from kvcomp.quantizer.base import Quantizer


@runtime_checkable
class RunHooks(Protocol):
    """What a compressed cache's layers ask of the run they belong to (``kvcomp.session.Session``)."""

    deferred: bool  # the model's attention reads the layers (kernels/interface.py): store after it ran
    guide_appended: int  # trailing tokens of the current forward that attention sees but are never stored

    def take_positions(self, layer_idx: int, seen: int, q: int, device: torch.device) -> torch.Tensor:
        """Absolute positions [q] of the tokens layer ``layer_idx`` receives in this forward."""
        ...

    def score(self, layer_idx: int, new_keys: torch.Tensor, positions: torch.Tensor, n_store: int,
              attn: tuple[torch.Tensor, torch.Tensor, float] | None) -> torch.Tensor | None:
        """Importance [n_store] of the stored new tokens, or None."""
        ...

    def token_bits(self, layer_idx: int, scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
        """Bits per token (0 = drop, -1 = the quantizer's width), or None (all at the quantizer's width)."""
        ...


class Standalone:
    """``RunHooks`` of a cache used outside a session: positions follow on, nothing scored, nothing dropped."""

    deferred = False
    guide_appended = 0

    def take_positions(self, layer_idx: int, seen: int, q: int, device: torch.device) -> torch.Tensor:
        return torch.arange(seen, seen + q, device=device)

    def score(self, *args: Any) -> None:
        return None

    def token_bits(self, *args: Any) -> None:
        return None


STANDALONE = Standalone()


class CompressedCache(Cache):
    """One ``CompressedLayer`` per decoder layer; a plain store. ``get_seq_length()`` stays absolute (tokens
    seen). Per-prompt state (positions after propagation, guide tokens, scores, the precision policy) belongs to
    the run the cache is bound to (``bind``; ``RunHooks``), by default ``Standalone``."""

    def __init__(self, model: Any, quantizer: Quantizer) -> None:
        from kvcomp.model.arch import Needs, check, ropes, text_config

        n_layers = text_config(model).num_hidden_layers
        check(model, Needs(pre_rope=quantizer.pre_rope, method="quantizer.pre_rope=true"))
        #: per layer: the model's RoPE for that layer (its layer type), None without RoPE
        self.ropes: list[Rope | None] = ropes(model) or [None] * n_layers
        self.rope = self.ropes[0]
        layers = [CompressedLayer(i, quantizer, self.ropes[i], self) for i in range(n_layers)]
        super().__init__(layers=layers)
        self.quantizer = quantizer
        self._run: Callable[[], RunHooks | None] = lambda: None

    @property
    def run(self) -> RunHooks:
        """The run this cache is bound to (held weakly: the cache stores K/V, not the run's objects)."""
        return self._run() or STANDALONE

    def bind(self, run: RunHooks) -> None:
        """Attach the run (a ``Session``) whose state the layers use."""
        self._run = weakref.ref(run)

    def end_prefill(self) -> None:
        """The prompt has been read: the RoPE memos of its forwards are dropped (``Rope.release``)."""
        for rope in {id(r): r for r in self.ropes if r is not None}.values():
            rope.release()

    # -- statistics --------------------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        """Exact bytes of the tensors held for the stored tokens (codes, scales, outliers, positions, statistics)."""
        return sum(layer.stats()["kv_bytes"] for layer in self.layers)

    @property
    def kv_bytes_reserved(self) -> int:
        """Bytes of the storage those tensors keep alive (>= ``kv_bytes`` where a tensor views a larger buffer)."""
        return sum(reserved_bytes(layer) for layer in self.layers)

    def get_compression_stats(self) -> dict[str, Any]:
        out = summarize([layer.stats() for layer in self.layers], self._shape())
        out["kv_bytes_reserved"] = self.kv_bytes_reserved
        return out

    def _shape(self) -> tuple[int, int, int]:
        for layer in self.layers:
            t = layer.res_k if layer.res_k is not None else (layer.k_blocks[0] if layer.k_blocks else None)
            if t is not None:
                b, h, _, d = t.shape
                return int(b), int(h), int(d)
        return 0, 0, 0


def summarize(layers: list[dict[str, Any]], shape: tuple[int, int, int]) -> dict[str, Any]:
    """Whole-cache statistics from per-layer stats. fp16 reference = a plain fp16 cache of every token the
    model processed (the sequence length) in every layer, also where propagation kept a layer from seeing
    some of them: those tokens are a saving too."""
    b, h, d = shape
    per_tok = b * h * d * 2  # bytes of one token's K (or V) in fp16
    fp16_k = max((ls["tokens_seen"] for ls in layers), default=0) * len(layers) * per_tok
    kb = sum(ls["key_bytes"] for ls in layers)
    vb = sum(ls["value_bytes"] for ls in layers)
    kv = sum(ls["kv_bytes"] for ls in layers)
    k_el = sum(ls["key_elements"] for ls in layers)
    v_el = sum(ls["value_elements"] for ls in layers)
    fp16 = 2 * fp16_k
    return {
        "kv_bytes": kv,
        "kv_bytes_fp16": fp16,
        "compression_ratio": fp16 / kv if kv else 0.0,
        "compression_ratio_key": fp16_k / kb if kb else 0.0,
        "compression_ratio_value": fp16_k / vb if vb else 0.0,
        "memory_savings": 1 - kv / fp16 if fp16 else 0.0,
        "overall_memory_savings": 1 - kv / fp16 if fp16 else 0.0,
        "avg_key_bits": 8 * kb / k_el if k_el else 0.0,
        "avg_value_bits": 8 * vb / v_el if v_el else 0.0,
        "outlier_ratio": sum(ls["outliers"] for ls in layers) / (k_el + v_el) if k_el + v_el else 0.0,
        "index_bytes": sum(ls["index_bytes"] for ls in layers),
        "stats_bytes": sum(ls["stats_bytes"] for ls in layers),
        "tokens_seen": max((ls["tokens_seen"] for ls in layers), default=0),
        "tokens_held": sum(ls["tokens_held"] for ls in layers),
        "tokens_dropped": sum(ls["tokens_dropped"] for ls in layers),
        "sink_tokens": sum(ls.get("sink_tokens", 0) for ls in layers),
        "per_layer": layers,
    }


def cache_stats(cache: Any) -> dict[str, Any]:
    """Statistics of any cache: ours, or a plain transformers cache (every held tensor counted)."""
    if hasattr(cache, "get_compression_stats"):
        return cache.get_compression_stats()
    layers, shape = [], (0, 0, 0)
    for i, layer in enumerate(getattr(cache, "layers", [])):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or k.numel() == 0:
            continue
        shape = (k.shape[0], k.shape[1], k.shape[3])
        n = int(k.shape[-2])
        layers.append({
            "layer": i, "tokens_seen": n, "tokens_held": n, "tokens_dropped": 0, "residual_tokens": n,
            "key_bytes": k.nbytes, "value_bytes": v.nbytes, "index_bytes": 0, "stats_bytes": 0,
            "kv_bytes": k.nbytes + v.nbytes, "key_elements": k.numel(), "value_elements": v.numel(),
            "outliers": 0, "avg_key_bits": 8 * k.element_size(), "avg_value_bits": 8 * v.element_size(),
        })
    return summarize(layers, shape)

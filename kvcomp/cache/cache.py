"""``CompressedCache``: a transformers ``Cache`` whose layers hold bit-packed K/V (see ``layer.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from kvcomp.cache.layer import CompressedLayer, PrecisionPolicy
from kvcomp.cache.rope import Rope, find_rotary
from kvcomp.kernels.chunk import RopeTable

if TYPE_CHECKING:
    from kvcomp.quantizer.base import Quantizer


class CompressedCache(Cache):
    """One ``CompressedLayer`` per decoder layer. ``get_seq_length()`` stays absolute (tokens seen).

    Hooks the compressor drives (all optional):

    - ``pending_positions[l]``: absolute positions of the tokens entering layer ``l`` (a propagator sets
      them after dropping hidden states); otherwise positions follow on from the tokens seen;
    - ``guide_appended``: trailing tokens of the current forward (a question appended to a prefill chunk)
      that attention sees but the cache never stores;
    - ``scoring``: an object with ``score(cache, layer_idx, new_keys, positions, n_store, attn) -> [n_store]``
      giving each stored token an importance; scores of layer ``l`` are kept in ``layer_scores[l]``;
    - ``policy``: maps those scores to bits per token (0 = drop, -1 = quantizer's width) when tokens are
      flushed (``kvcomp.compressor.precision.Precision``).
    """

    def __init__(self, model: Any, quantizer: Quantizer, policy: PrecisionPolicy | None = None,
                 scoring: Any = None) -> None:
        n_layers = model.config.num_hidden_layers
        rotary = find_rotary(model)
        if quantizer.pre_rope and rotary is None:
            raise ValueError("quantizer.pre_rope=true needs a model with a rotary_emb module; set it to false")
        self.rope = Rope(rotary) if rotary is not None else None
        self.rope_table = RopeTable(rotary) if rotary is not None else None
        layers = [CompressedLayer(i, quantizer, self.rope, self) for i in range(n_layers)]
        super().__init__(layers=layers)
        self.quantizer = quantizer
        self.policy = policy
        self.scoring = scoring
        self.pending_positions: dict[int, torch.Tensor] = {}
        self.step_positions: torch.Tensor | None = None  # absolute positions of this forward's tokens
        self.layer_scores: dict[int, torch.Tensor] = {}
        self.guide_appended = 0
        self.guide_ids: torch.Tensor | None = None  # question ids appended to non-final prefill chunks
        self.prompt_len = 0  # set by prefill (a budget in tokens becomes a ratio of it)
        self.deferred = False  # True while the model's attention reads this cache (kernels/interface.py)

    # -- hooks used by the layers ------------------------------------------------------------------
    def take_positions(self, layer_idx: int, seen: int, q: int, device: torch.device) -> torch.Tensor:
        """Absolute positions [q] of the tokens a layer receives in this forward."""
        pos = self.pending_positions.pop(layer_idx, None)
        if pos is None:
            # layer 0 sees every token, so its count is absolute; later layers reuse its positions for this
            # forward (after propagation dropped tokens, their own count is smaller than the sequence)
            step = self.step_positions
            if layer_idx == 0 or step is None or step.numel() != q:
                step = torch.arange(seen, seen + q, device=device)
                if layer_idx == 0:
                    self.step_positions = step
            return step.to(device)
        if pos.numel() != q:
            raise RuntimeError(f"layer {layer_idx}: {pos.numel()} pending positions for {q} new tokens")
        return pos.to(device)

    def score(self, layer_idx: int, new_keys: torch.Tensor, positions: torch.Tensor, n_store: int,
              attn: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        """Importance [n_store] of the stored new tokens (None without a scorer or during decode). ``attn``:
        (post-RoPE queries ``[B, Hq, q, D]``, their log-sum-exp over everything they attended to ``[B, Hq, q]``)."""
        if self.scoring is None or new_keys.shape[-2] == 1:
            return None
        s = self.scoring.score(self, layer_idx, new_keys, positions, n_store, attn)
        self.layer_scores[layer_idx] = s
        return s

    def token_bits(self, layer_idx: int, scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
        return None if self.policy is None else self.policy(scores, pos, self.prompt_len)

    # -- statistics --------------------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        return sum(layer.stats()["kv_bytes"] for layer in self.layers)

    def get_compression_stats(self) -> dict[str, Any]:
        return summarize([layer.stats() for layer in self.layers], self._shape())

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

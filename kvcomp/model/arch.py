"""What kvcomp needs to know about a transformers decoder, read from the model itself, and what it refuses.

- ``decoder_layers``: the decoder layer list (``model.layers``, ``gpt_neox.layers``, ``transformer.h``...): the
  ``ModuleList`` under the base model whose length is the config's layer count;
- ``attention``: each layer's attention module (``self_attn``, ``attention``, ``attn``, ``self_attention``);
- ``routed``: the model's attention goes through transformers' attention-function registry
  (``ALL_ATTENTION_FUNCTIONS``), which kvcomp's compressed runs attend through (queries for scorers included);
- ``windows``: each layer's sliding window (``config.layer_types`` + ``sliding_window``), None = full;
- ``ropes``: one :class:`~kvcomp.model.rope.Rope` per layer (per layer type when the rotary module takes one),
  using the model's own ``apply_rotary_pos_emb`` (split-half, interleaved, partial: whatever the model does);
- ``check``: refuse up front (``ConfigError``, a ``ValueError``) what a method needs and the model lacks.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch

from kvcomp.errors import ConfigError
from kvcomp.model.rope import Rope

ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
Q_NORMS = ("q_norm", "q_layernorm", "query_layernorm")  # norms applied to the queries only (Qwen3, StableLM...)
MASK_IMPLS = ("sdpa", "eager")  # implementations that read the 4-D masks kvcomp rebuilds
SLIDING_TYPES = ("sliding_attention",)
FULL_TYPES = ("full_attention",)
SEQ_DEPENDENT_ROPE = ("dynamic", "longrope")  # frequencies change with the sequence length


@dataclass(frozen=True)
class Needs:
    """What a configured compressor needs from the model (``Compressor.needs``)."""

    pre_rope: bool = False  # keys stored before RoPE (invert, re-apply)
    queries: bool = False  # a scorer reads the attention's queries
    masks: bool = False  # per-layer masks rebuilt (tokens dropped or hidden states sliced)
    slicing: bool = False  # propagation slices hidden states between layers
    cache: bool = False  # kvcomp's CompressedCache replaces the model's (full / sliding attention layers only)
    method: str = ""  # for messages: "quantizer.pre_rope=true", "scorer=snapkv", ...


def text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _name(model: Any) -> str:
    return type(model).__name__


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder layers: the shallowest ``ModuleList`` under the base model with ``num_hidden_layers`` entries."""
    n = getattr(text_config(model), "num_hidden_layers", None)
    base = getattr(model, "base_model", model)
    best: tuple[int, Any] | None = None
    for name, mod in base.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, mod)
    if best is None:
        raise ConfigError(f"{_name(model)}: no decoder layer list with config.num_hidden_layers={n} entries found; "
                          "this method installs per-layer hooks, so it needs a decoder LM (int8 / kvquant_stream "
                          "need none)")
    return best[1]


def attention(model: Any, layer: Any) -> Any:
    """The attention module of one decoder layer."""
    for nm in ATTN_NAMES:
        mod = getattr(layer, nm, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise ConfigError(f"{_name(model)}: {type(layer).__name__} has no attention module named one of "
                      f"{', '.join(ATTN_NAMES)}; scorers and propagation need it")


def _heads(model: Any, attn: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of an attention module."""
    cfg = text_config(model)
    hq = int(cfg.num_attention_heads)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    d = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or getattr(cfg, "head_dim", None)
    return hq, hkv, int(d or cfg.hidden_size // hq)


def layer_types(model: Any) -> list[str]:
    """Per-layer attention type: ``config.layer_types``, else sliding everywhere when ``sliding_window`` is set."""
    cfg = text_config(model)
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return ["sliding_attention" if window else "full_attention"] * n


def windows(model: Any) -> list[int | None]:
    """Per-layer sliding window (None = full attention); unknown layer types are refused."""
    cfg = text_config(model)
    out: list[int | None] = []
    for t in layer_types(model):
        if t in SLIDING_TYPES:
            out.append(int(cfg.sliding_window))
        elif t in FULL_TYPES:
            out.append(None)
        else:
            raise ConfigError(f"{_name(model)}: layer type {t!r} (config.layer_types) is not one kvcomp's cache "
                              f"and masks handle (supported: {', '.join(SLIDING_TYPES + FULL_TYPES)}); use "
                              "full_cache with this model")
    return out


def find_rotary(model: Any) -> Any | None:
    """The model's shared rotary embedding module (a ``*rotary_emb`` module with inverse-frequency buffers)."""
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb") and any(b.endswith("inv_freq") for b, _ in mod.named_buffers(recurse=False)):
            return mod
    return None


def rope_fn(model: Any) -> Any | None:
    """The model's own ``apply_rotary_pos_emb(q, k, cos, sin)`` (looked up in its attention class's module)."""
    try:
        attn = attention(model, decoder_layers(model)[0])
    except ConfigError:
        return None
    return getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)


def ropes(model: Any) -> list[Any] | None:
    """One Rope per decoder layer (shared per layer type), or None if the model has no RoPE kvcomp can drive."""
    rotary, fn = find_rotary(model), rope_fn(model)
    if rotary is None or (fn is None and isinstance(model, torch.nn.Module)):
        return None  # (a stand-in that is no nn.Module, e.g. the kernels' self-check, gets split-half RoPE)
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    types = layer_types(model)
    try:
        d: int | None = _heads(model, attention(model, decoder_layers(model)[0]))[2]
    except ConfigError:
        d = None
    made: dict[str | None, Rope] = {}
    for t in types:
        key = t if per_type else None
        if key not in made:
            made[key] = Rope(rotary, fn, key, seq_limit(model, rotary, key))
            made[key].self_check(_name(model), d)  # an exact round trip, or a ConfigError
    return [made[t if per_type else None] for t in types]


def seq_limit(model: Any, rotary: Any, layer_type: str | None) -> int | None:
    """For RoPE whose frequencies change with the sequence length (dynamic, longrope): the length up to which
    they stay fixed (beyond it a re-rotated key would differ from the one the model cached); else None."""
    rt = getattr(rotary, "rope_type", None)
    rt = rt.get(layer_type) if isinstance(rt, dict) else rt
    if rt not in SEQ_DEPENDENT_ROPE:
        return None
    cfg = text_config(model)
    params = getattr(cfg, "rope_parameters", None) or {}
    params = params.get(layer_type, params) if layer_type else params
    lim = params.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
    return int(lim or getattr(rotary, "original_max_seq_len", None) or cfg.max_position_embeddings)


def routed(model: Any) -> None:
    """ConfigError unless ``model`` can switch its attention implementation (its attention modules call
    ``ALL_ATTENTION_FUNCTIONS``): kvcomp's compressed run attends through ``kvcomp_packed`` there, and a model that
    keeps its own attention would read only each forward's new tokens. transformers' own test
    (``_can_set_attn_implementation``, a source heuristic) when it has one; ``use_packed_attention`` checks the
    switch took effect anyway."""
    can = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can) and not can():
        raise ConfigError(f"{_name(model)}: its attention does not go through transformers' attention-function "
                          "registry (ALL_ATTENTION_FUNCTIONS), which kvcomp's compressed cache is read through; "
                          "use compressor=none (full_cache) with this model")


def check(model: Any, needs: Needs) -> None:
    """Raise ConfigError (one line: model class, feature, what to change) if ``model`` cannot give ``needs``."""
    cls = _name(model)
    if needs.cache:
        windows(model)  # every layer an attention layer kvcomp's cache can stand in for
        routed(model)
    if not (needs.pre_rope or needs.queries or needs.masks or needs.slicing):
        return
    rp = ropes(model)
    if needs.pre_rope and rp is None:
        raise ConfigError(f"{cls}: {needs.method} stores keys before RoPE, but kvcomp finds no rotary_emb module "
                          "with an apply_rotary_pos_emb it can invert; set quantizer.pre_rope=false")
    if not (needs.queries or needs.masks or needs.slicing):
        return
    for layer in decoder_layers(model):
        attention(model, layer)  # scorers read each layer's queries in its attention call (module.layer_idx)
    if needs.masks or needs.slicing:
        impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
        if impl not in MASK_IMPLS:
            raise ConfigError(f"{cls}: attn_implementation={impl} takes no per-layer 4-D masks, which {needs.method} "
                              "needs (it drops tokens); load the model with attn_implementation='sdpa' or 'eager' "
                              "(model.attn_implementation=sdpa)")
        windows(model)
        if rp is None:
            raise ConfigError(f"{cls}: {needs.method} drops tokens, which keeps positions right only for RoPE "
                              "models (kvcomp finds no rotary_emb / apply_rotary_pos_emb); use a method that drops "
                              "nothing (int8 with quantizer.pre_rope=false)")

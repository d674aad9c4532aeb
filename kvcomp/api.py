"""Python API without Hydra's CLI: compress any transformers causal LM for the duration of a ``with`` block.

    import kvcomp
    with kvcomp.compress(model, "kvquant_stream", chunk_size=256) as run:
        out = model.generate(**inputs, max_new_tokens=32)     # plain HF generate, compressed cache
    print(run.stats())                                        # kv_bytes, compression_ratio, ...

``method`` is an experiment name from ``conf/experiment/``; the config is composed through Hydra's compose
API and built by the same registries as the CLI. Inside the block the *instance's* ``generate`` is wrapped:
it opens a ``compressor.session`` (fresh cache + the compressor's hooks), prefills the prompt except its last
token chunk by chunk into that cache, then calls the original ``generate`` with
``past_key_values=cache`` (which runs the last prompt token and decodes). Nothing is global: the class,
other models and other runs are untouched; on exit the instance attribute is removed again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kvcomp.errors import ConfigError, unknown_choice

#: groups searched, in order, for an override given without a dot (``chunk_size=256``); it is set in each
#: group that has the key
SHORT_KEY_GROUPS = ("compressor", "compressor.precision", "quantizer", "scorer", "propagation")


def conf_dir() -> Path:
    """The config tree: ``$KVCOMP_CONF_DIR`` or ``conf/`` next to the ``kvcomp`` package (source checkout)."""
    env = os.environ.get("KVCOMP_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "conf"
    if not (path / "config.yaml").exists():
        raise ConfigError(f"kvcomp config dir {path} has no config.yaml; set KVCOMP_CONF_DIR=<repo>/conf")
    return path


def methods() -> list[str]:
    """Experiment names usable as ``method``."""
    root = conf_dir() / "experiment"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _compose(overrides: list[str]) -> Any:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def _leaf_keys(node: Any, prefix: str) -> list[str]:
    from omegaconf import DictConfig

    out = []
    for k in node:
        v = node._get_node(k)
        out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, DictConfig) else [f"{prefix}{k}"]
    return out


def _select(cfg: Any, dotted: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, dotted, throw_on_missing=False, default=None)


def resolve_overrides(base: Any, short: dict[str, Any], dotted: dict[str, Any]) -> list[str]:
    """Hydra override strings for ``short`` (key without a dot, looked up in ``SHORT_KEY_GROUPS``) and
    ``dotted`` (full config paths). Unknown keys raise ConfigError (a ValueError) listing the choices."""
    from omegaconf import DictConfig

    pairs: dict[str, Any] = {}
    choices = [k for g in ("compressor", "quantizer", "scorer", "propagation")
               if isinstance(_select(base, g), DictConfig) for k in _leaf_keys(_select(base, g), f"{g}.")]
    choices = [c for c in choices if not c.endswith(".name")]
    for key, val in short.items():
        hits = [f"{g}.{key}" for g in SHORT_KEY_GROUPS
                if isinstance(_select(base, g), DictConfig) and key in _select(base, g) and key != "name"]
        if not hits:
            shorts = sorted({c.rsplit(".", 1)[-1] for c in choices})
            raise unknown_choice("override", key, shorts)
        pairs.update(dict.fromkeys(hits, val))
    for key, val in dotted.items():
        group = key.split(".", 1)[0]
        if "." not in key or _select(base, group) is None or key not in _leaf_keys(_select(base, group), f"{group}."):
            raise unknown_choice("override", key, choices)
        pairs[key] = val
    return [f"{k}={_hydra_value(v)}" for k, v in pairs.items()]


def _hydra_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list | tuple):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("'", "\\'") + "'"
    return repr(v)


def build_compressor(method: str, overrides: dict[str, Any] | None = None, **short: Any) -> Any:
    """The configured compressor of experiment ``method`` (validated; no model is loaded)."""
    from kvcomp.experiment import build_parts

    names = methods()
    if method not in names:
        raise unknown_choice("method", method, names)
    base = _compose([f"+experiment={method}"])
    extra = resolve_overrides(base, short, dict(overrides or {}))
    cfg = _compose([f"+experiment={method}", *extra]) if extra else base
    return build_parts(cfg).compressor


def _as_ids(ids: Any, vocab: int | None = None, what: str = "question_ids") -> torch.Tensor | None:
    """List of ids or a tensor ``[T]`` / ``[1, T]`` -> LongTensor ``[1, T]`` (None stays None); ids outside
    ``[0, vocab)`` are a ValueError."""
    if ids is None:
        return None
    t = torch.as_tensor(ids, dtype=torch.long)
    t = t[None] if t.dim() == 1 else t
    if vocab is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"{what} holds id {int(t.max()) if int(t.max()) >= vocab else int(t.min())}, outside the "
                         f"model's vocabulary [0, {vocab}); pass token ids from this model's tokenizer")
    return t


def _vocab(model: Any) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if emb is not None and hasattr(emb, "num_embeddings") else None


class CompressedRun:
    """Context manager returned by :func:`compress`; wraps ``model.generate`` of one instance."""

    def __init__(self, model: Any, compressor: Any, method: str, question_ids: Any = None) -> None:
        self.model, self.compressor, self.method = model, compressor, method
        self.vocab = _vocab(model)
        self.question: torch.Tensor | None = _as_ids(question_ids, self.vocab)
        self._stats: dict[str, Any] | None = None
        self._saved: Any = None
        self._active = False

    def set_question(self, ids: Any) -> None:
        """Question token ids (list, ``[T]`` or ``[1, T]``) for prompt-guided scorers; None clears it."""
        self.question = _as_ids(ids, self.vocab)

    def stats(self) -> dict[str, Any]:
        """Cache statistics of the last ``generate`` (keys of ``CompressedCache.get_compression_stats``)."""
        if self._stats is None:
            raise RuntimeError("no generate has run inside this kvcomp.compress block yet")
        return dict(self._stats)

    def __enter__(self) -> CompressedRun:
        if self._active:
            raise RuntimeError("this kvcomp.compress run is already active")
        if getattr(self.model.generate, "_kvcomp_run", None) is not None:
            raise RuntimeError("this model is already inside a kvcomp.compress block")
        self._saved = self.model.__dict__.get("generate")  # an instance attribute the user set, if any
        self._orig = self.model.generate
        self.model.generate = self._wrap(self._orig)
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved is None:
            self.model.__dict__.pop("generate", None)
        else:
            self.model.generate = self._saved
        self._active = False

    def _wrap(self, orig: Any) -> Any:
        def generate(inputs: Any = None, *args: Any, **kwargs: Any) -> Any:
            return self.generate(orig, inputs, *args, **kwargs)

        generate._kvcomp_run = self  # type: ignore[attr-defined]
        generate.__doc__ = orig.__doc__
        return generate

    @torch.inference_mode()
    def generate(self, orig: Any, inputs: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Chunked prefill of ``input_ids[:, :-1]`` into a fresh compressed cache, then ``orig`` from there."""
        if kwargs.get("past_key_values") is not None:
            raise ValueError("inside kvcomp.compress the cache is kvcomp's; do not pass past_key_values")
        question = _as_ids(kwargs.pop("question_ids", None), self.vocab)
        question = question if question is not None else self.question
        ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 1:
            raise ValueError("kvcomp.compress needs input_ids [B, T] (a LongTensor, T >= 1) passed to generate")
        _as_ids(ids, self.vocab, "input_ids")
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not bool(mask.all()):
            raise ValueError("padded batches are not supported inside kvcomp.compress; pass one prompt at a time")
        expand = self._check_generate(ids, kwargs)
        device = ids.device
        q = question.to(device) if question is not None else None
        with self.compressor.session(self.model, q) as s:
            if ids.shape[1] > 1:
                s.prefill(ids[:, :-1])
            if expand > 1:  # generate repeats input_ids per beam / sequence; the prefilled cache follows
                s.cache.batch_repeat_interleave(expand)
            out = orig(ids, *args, past_key_values=s.cache, attention_mask=torch.ones_like(ids), **kwargs)
        self._stats = s.stats()
        return out

    def _check_generate(self, ids: torch.Tensor, kwargs: dict[str, Any]) -> int:
        """Refuse what kvcomp's cache cannot do exactly, before any prefill; return the rows per prompt."""
        from kvcomp.model.arch import ropes, text_config

        for key in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}= (assisted decoding) crops the cache, which kvcomp's cannot; drop {key}")
        gc = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        nb = int(kwargs.get("num_beams") or getattr(gc, "num_beams", 1) or 1)
        nrs = int(kwargs.get("num_return_sequences") or getattr(gc, "num_return_sequences", 1) or 1)
        if ids.shape[0] > 1 and getattr(self.compressor, "scorer", None) is not None:
            raise ValueError(f"{self.method} decides by importance which tokens to keep (and at which width) once "
                             f"for the whole batch, so rows would share one decision; pass one prompt at a time "
                             f"(batch of {ids.shape[0]} given)")
        needs = self.compressor.needs(text_config(self.model).num_hidden_layers)
        exact = self.compressor.chunk_size == 0 and not (needs.pre_rope or needs.masks)  # the plain cache's way
        limit = min((r.limit for r in ropes(self.model) or [] if r is not None and r.limit), default=None)
        new = int(kwargs.get("max_new_tokens") or getattr(gc, "max_new_tokens", None) or 0)
        if limit is not None and not exact and ids.shape[1] + new > limit:
            raise ValueError(f"{type(self.model).__name__}: its RoPE rescales with the sequence length past {limit} "
                             f"tokens, so kvcomp's re-rotated keys would differ from the model's; prompt + "
                             f"max_new_tokens = {ids.shape[1] + new}: keep it <= {limit}")
        return max(nb, nrs)


def compress(model: Any, method: str, *, overrides: dict[str, Any] | None = None, question_ids: Any = None,
             **short: Any) -> CompressedRun:
    """Compress ``model``'s KV cache with experiment ``method`` inside a ``with`` block.

    ``short`` keyword overrides are keys without a dot (``chunk_size=256``, ``keep_ratio=0.25``), set in
    every group that has them; ``overrides`` takes full paths (``{"quantizer.key_bits_normal": 8}``).
    ``question_ids`` (or ``run.set_question``) guides prompt-guided scorers. Unknown methods or keys raise
    ``ValueError`` naming the choices.
    """
    if not callable(getattr(model, "generate", None)) or not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} is not a transformers causal LM (no generate/config)")
    compressor = build_compressor(method, overrides, **short)
    compressor.check(model)  # unsupported model x method: one ValueError now, before any prefill
    return CompressedRun(model, compressor, method, question_ids)

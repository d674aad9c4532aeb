"""How many positions a model was trained for, read from its config or GGUF metadata without loading weights."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

from kvcomp.errors import ConfigError
from kvcomp.model.loader import ModelConfig, cache_dir


def max_positions(cfg: ModelConfig) -> int | None:
    """The model's ``max_position_embeddings`` from its config (no weights read); None if unknown here."""
    if cfg.source == "random":
        if "max_position_embeddings" in cfg.random:  # conf/model/tiny_llama.yaml states it
            n = cfg.random["max_position_embeddings"]
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ConfigError(f"model.random.max_position_embeddings={n} must be an integer > 0")
            return n
        from kvcomp.model.tiny import tiny_llama

        return int(inspect.signature(tiny_llama).parameters["max_position_embeddings"].default)
    if cfg.source == "embedded_gguf":
        converted = cache_dir() / Path(str(cfg.gguf_file)).stem
        return _from_config(str(converted)) if (converted / "config.json").exists() else _from_gguf(cfg)
    return _from_config(str(cfg.name_or_path))


def _from_config(path: str) -> int | None:
    """``max_position_embeddings`` from the ``config.json`` of a local dir or of a hub id already in the
    local hub cache (never the network; the loader reports a model it cannot get)."""
    file = Path(path) / "config.json"
    if not file.exists():
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(path, "config.json")
        except ValueError:  # not a repo id either
            return None
        if not isinstance(found, str):
            return None
        file = Path(found)
    conf = json.loads(file.read_text(encoding="utf-8"))
    n = conf.get("max_position_embeddings") or (conf.get("text_config") or {}).get("max_position_embeddings")
    return int(n) if n else None


def _from_gguf(cfg: ModelConfig) -> int | None:
    """``<arch>.context_length`` from the GGUF's metadata (before its first conversion)."""
    spec = importlib.util.find_spec(str(cfg.gguf_package))  # no import: its __init__ needs skipped deps
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / str(cfg.gguf_file)
    if not path.exists():
        return None
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    arch = fields["general.architecture"]
    key = bytes(arch.parts[arch.data[0]]).decode() + ".context_length"
    return int(fields[key].parts[fields[key].data[0]][0]) if key in fields else None

"""Checks a run passes before any model or data loads (``experiment.run`` calls these first).

- the top-level keys (``seed``, ``compare_baseline``, ``allow_long_context``, ``budget_kv_bytes``) have the
  types and ranges declared on ``RunSettings`` (components check theirs when the registry binds them), and
  ``objective=score_under_budget`` comes with a ``budget_kv_bytes``;
- the task's longest prompt plus generation fits the model's ``max_position_embeddings``, read from the
  model's config without loading weights, unless ``allow_long_context=true``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import logging
from pathlib import Path
from typing import Any

from kvcomp.errors import ConfigError
from kvcomp.fields import check, param
from kvcomp.model.loader import ModelConfig, cache_dir

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunSettings:
    """Top-level keys of ``conf/config.yaml`` that are values (not config groups)."""

    seed: int = param(0, ge=0)
    compare_baseline: bool = False
    allow_long_context: bool = False  # run past the model's max_position_embeddings anyway
    budget_kv_bytes: float | None = param(None, gt=0)


def check_settings(c: dict[str, Any]) -> None:
    """ConfigError naming the top-level key whose value is not allowed (before the groups are built)."""
    names = {f.name for f in dataclasses.fields(RunSettings)}
    check(RunSettings, {k: v for k, v in c.items() if k in names}, "")
    spec = c.get("objective", "score")
    specs = spec if isinstance(spec, list | tuple) else [spec]
    if "score_under_budget" in specs and c.get("budget_kv_bytes") is None:
        raise ConfigError("objective=score_under_budget needs budget_kv_bytes=<bytes> (a positive number)")


def check_context(c: dict[str, Any], model: ModelConfig, task: Any) -> None:
    """ConfigError if the task needs more positions than the model was trained for (unless allowed)."""
    need = task.positions_needed()
    if need is None or c.get("allow_long_context"):
        return
    limit = max_positions(model)
    if limit is not None and need[0] > limit:
        raise ConfigError(
            f"{need[1]} = {need[0]} positions exceed model={model.name}'s max_position_embeddings={limit}; "
            "shorten the task, or pass allow_long_context=true to run past the trained length anyway"
        )


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

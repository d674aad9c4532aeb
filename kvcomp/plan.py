"""A run's config bound once, before anything loads: ``build_parts(cfg) -> Parts``.

One pass, in this order, each step raising one ``ConfigError`` line naming the key and what is allowed:

1. top-level values (``RunSettings``: ``seed``, ``compare_baseline``, ``allow_long_context``,
   ``budget_kv_bytes``; declared once as typed fields with bounds);
2. every config group is present; each component is built by its registry (keys, types, bounds);
3. cross-field rules: a scorer needs ``compressor=unified``; a fidelity objective needs ``task.fidelity=true``;
   ``objective=score_under_budget`` needs ``budget_kv_bytes``;
4. the task's longest prompt plus generation against the model's ``max_position_embeddings`` (read from its
   config without loading weights), unless ``allow_long_context=true``.

``experiment.run`` then loads the model and runs what this returned; nothing is validated after it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kvcomp.errors import ConfigError
from kvcomp.fields import bind, check, param
from kvcomp.model.loader import ModelConfig
from kvcomp.model.positions import max_positions
from kvcomp.registry import COMPRESSORS, LOGGERS, PROPAGATORS, QUANTIZERS, SCORERS, TASKS
from kvcomp.stats import FIDELITY_KEYS

GROUPS = ("model", "compressor", "quantizer", "propagation", "task")


@dataclasses.dataclass
class RunSettings:
    """Top-level keys of ``conf/config.yaml`` that are values (not config groups)."""

    seed: int = param(0, ge=0)
    compare_baseline: bool = False
    allow_long_context: bool = False  # run past the model's max_position_embeddings anyway
    budget_kv_bytes: float | None = param(None, gt=0)


@dataclasses.dataclass
class Parts:
    """Everything a run needs except the model, built and checked from the config."""

    model: ModelConfig
    compressor: Any
    task: Any
    logger: Any
    settings: RunSettings = dataclasses.field(default_factory=RunSettings)
    objective: Any = "score"  # a metric name, score_under_budget, or a list of names


def to_dict(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def build_parts(cfg: DictConfig | dict[str, Any]) -> Parts:
    """Bind and validate the whole composed config (steps 1-4 of the module doc); no model is loaded."""
    c = to_dict(cfg)
    settings = check_settings(c)
    for key in GROUPS:
        if not isinstance(c.get(key), dict):
            raise ConfigError(f"config group '{key}' is missing; pass {key}=<option>")
    model = bind(ModelConfig, c["model"], "model")
    compressor = _compressor(c)
    task = TASKS.build(c["task"], "task")
    spec = c.get("objective", "score")
    wanted = [str(x) for x in (spec if isinstance(spec, list | tuple) else [spec])]
    if not getattr(task, "fidelity", False) and any(w in FIDELITY_KEYS for w in wanted):
        raise ConfigError(f"objective={spec} is a fidelity metric; set task.fidelity=true (or use a "
                          "hpo/*_fidelity preset)")
    logger = LOGGERS.build(c.get("logger") or {"name": "none"}, "logger")
    check_context(settings, model, task)
    return Parts(model, compressor, task, logger, settings, spec)


def check_settings(c: dict[str, Any]) -> RunSettings:
    """The top-level values bound to ``RunSettings`` (ConfigError naming the key whose value is not allowed)."""
    names = {f.name for f in dataclasses.fields(RunSettings)}
    given = {k: v for k, v in c.items() if k in names}
    check(RunSettings, given, "")
    spec = c.get("objective", "score")
    specs = spec if isinstance(spec, list | tuple) else [spec]
    if "score_under_budget" in specs and c.get("budget_kv_bytes") is None:
        raise ConfigError("objective=score_under_budget needs budget_kv_bytes=<bytes> (a positive number)")
    return RunSettings(**given)


def check_context(settings: RunSettings, model: ModelConfig, task: Any) -> None:
    """ConfigError if the task needs more positions than the model was trained for (unless allowed)."""
    need = task.positions_needed()
    if need is None or settings.allow_long_context:
        return
    limit = max_positions(model)
    if limit is not None and need[0] > limit:
        raise ConfigError(
            f"{need[1]} = {need[0]} positions exceed model={model.name}'s max_position_embeddings={limit}; "
            "shorten the task, or pass allow_long_context=true to run past the trained length anyway"
        )


def _compressor(c: dict[str, Any]) -> Any:
    """The compressor with the sub-components (quantizer, propagator, scorer) its class takes."""
    parts: dict[str, Any] = {"quantizer": QUANTIZERS.build(c["quantizer"], "quantizer"),
                             "propagator": PROPAGATORS.build(c["propagation"], "propagation")}
    if c.get("scorer"):
        parts["scorer"] = SCORERS.build(c["scorer"], "scorer")
    ccfg = c["compressor"]
    cname = str(ccfg.get("name", ""))
    if cname == "none" and "scorer" in parts and getattr(parts["scorer"], "registry_name", "") != "none":
        raise ConfigError(f"scorer={parts['scorer'].registry_name} needs compressor=unified (compressor=none "
                          "is the plain full cache)")
    cls = COMPRESSORS.get(cname, "compressor.name") if "name" in ccfg else None
    accepts = ({f.name for f in dataclasses.fields(cls)} if cls is not None and dataclasses.is_dataclass(cls)
               else {"quantizer", "propagator"})
    return COMPRESSORS.build(ccfg, "compressor", **{k: v for k, v in parts.items() if k in accepts})

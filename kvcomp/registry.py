"""A small typed registry: one per component kind; components register by name.

Duplicate names fail at import; unknown names fail with the list of choices and the closest match;
config keys are checked against the component's constructor, and their values against the types and
bounds declared on its dataclass fields (``kvcomp.fields``), before anything heavy (a model) loads.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from kvcomp.errors import ConfigError, RegistryError, unknown_choice
from kvcomp.fields import check, check_keys

T = TypeVar("T")

#: registry kind -> package that holds one module per component
KIND_PACKAGES = {
    "scorer": "kvcomp.scorer",
    "quantizer": "kvcomp.quantizer",
    "propagator": "kvcomp.propagator",
    "compressor": "kvcomp.compressor",
    "task": "kvcomp.task",
    "logger": "kvcomp.logger",
}
#: keys of a component config that are not constructor arguments
RESERVED_KEYS = ("name", "_target_")


class Registry(Generic[T]):
    """Name -> component class for one kind (``quantizer``, ``scorer``, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@QUANTIZERS.register("kivi")``. A second class with the same name fails."""

        def deco(cls: type[T]) -> type[T]:
            prev = self._items.get(name)
            if prev is not None and prev.__qualname__ != cls.__qualname__:
                raise RegistryError(
                    f"duplicate {self.kind} name '{name}': {prev.__module__}.{prev.__qualname__} "
                    f"and {cls.__module__}.{cls.__qualname__}"
                )
            self._items[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def _load(self) -> None:
        """Import every module of the kind's package so its components register (once)."""
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(KIND_PACKAGES[self.kind])
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str, key: str | None = None) -> type[T]:
        """Class registered as ``name``; unknown names raise ConfigError naming ``key`` and the choices."""
        self._load()
        if name not in self._items:
            raise unknown_choice(key or f"{self.kind}.name", name, self._items)
        return self._items[name]

    def build(self, cfg: Mapping[str, Any] | None, key: str | None = None, **extra: Any) -> T:
        """Instantiate from a config mapping with ``name`` (or ``_target_``) plus constructor keys.

        ``key`` is the config path used in error messages (``quantizer``, ``compressor.scorer``);
        ``extra`` are objects passed by the caller (e.g. sub-components), not from the config.
        """
        key = key or self.kind
        cfg = dict(cfg or {})
        if "_target_" in cfg:
            cls = _import_target(cfg["_target_"], key)
        elif "name" in cfg:
            cls = self.get(str(cfg["name"]), key=f"{key}.name")
        else:
            raise ConfigError(f"{key}: needs 'name' (one of: {', '.join(self.names())}) or '_target_'")
        kwargs = {k: v for k, v in cfg.items() if k not in RESERVED_KEYS}
        check_keys(cls, kwargs, key)
        check(cls, kwargs, key)  # types and bounds declared on the fields (kvcomp.fields)
        try:
            return cls(**kwargs, **extra)
        except ConfigError:
            raise
        except TypeError as e:  # wrong type that the signature check could not see
            raise ConfigError(f"{key}: {e}") from None


def _import_target(path: str, key: str) -> type:
    mod_name, _, attr = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}._target_={path} cannot be imported") from None


SCORERS: Registry[Any] = Registry("scorer")
QUANTIZERS: Registry[Any] = Registry("quantizer")
PROPAGATORS: Registry[Any] = Registry("propagator")
COMPRESSORS: Registry[Any] = Registry("compressor")
TASKS: Registry[Any] = Registry("task")
LOGGERS: Registry[Any] = Registry("logger")
REGISTRIES: dict[str, Registry[Any]] = {
    r.kind: r for r in (SCORERS, QUANTIZERS, PROPAGATORS, COMPRESSORS, TASKS, LOGGERS)
}

"""Hydra plugins of kvcomp: ``sweeps/`` on the search path and the resumable Optuna sweeper.

Hydra imports every module under the ``hydra_plugins`` namespace at start-up, so this file stays light:
Optuna and the sweep loop are imported only when ``hydra/sweeper=kvcomp_optuna`` is used.

- ``kvcomp-sweeps://<dir>``: a config source that exposes only the ``sweeps`` group of ``<dir>`` (the
  repository root), so ``+sweeps=hpo/tpe`` selects ``sweeps/hpo/tpe.yaml`` from any working directory.
- ``hydra/sweeper=kvcomp_optuna``: hydra-optuna-sweeper with RDB storage by default, ``n_trials`` as
  the study's total (reruns only run what is missing), failed trials recorded and skipped, and
  ``compare`` (several samplers, same budget and seed) for ``+sweeps=hpo/compare_all``.
"""

# no `from __future__ import annotations`: Hydra executes this module before it is in sys.modules,
# and dataclasses with string annotations look the module up there.

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

GROUP = "sweeps"
ROOT = Path(os.environ.get("KVCOMP_SWEEPS_ROOT") or Path(__file__).resolve().parents[2])


class KvcompSweepsConfigSource(FileConfigSource):
    """The ``sweeps/`` folder of a directory, and nothing else in it."""

    @staticmethod
    def scheme() -> str:
        return "kvcomp-sweeps"

    @staticmethod
    def _inside(config_path: str) -> bool:
        return config_path.strip("/").split("/")[0] == GROUP

    def load_config(self, config_path: str) -> ConfigResult:
        if not self._inside(config_path):
            raise ConfigLoadError(f"Config not found : {config_path}")
        return super().load_config(config_path)

    def is_group(self, config_path: str) -> bool:
        return (config_path == "" or self._inside(config_path)) and super().is_group(config_path)

    def is_config(self, config_path: str) -> bool:
        return self._inside(config_path) and super().is_config(config_path)

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) and self.is_group(GROUP) else []
        return super().list(config_path, results_filter) if self._inside(config_path) else []


class KvcompSearchPathPlugin(SearchPathPlugin):
    """Puts the repository's ``sweeps/`` folder on every kvcomp run's search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if (ROOT / GROUP).is_dir():
            search_path.append(provider="kvcomp-sweeps", path=f"kvcomp-sweeps://{ROOT}")


class KvcompOptunaSweeper(Sweeper):
    """hydra-optuna-sweeper, resumable: see ``kvcomp.sweep.sweeper``."""

    def __init__(self, **kwargs: Any) -> None:
        from kvcomp.sweep.sweeper import ResumableOptunaSweeper

        self.sweeper = ResumableOptunaSweeper(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)


def _register() -> None:
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf

    @dataclass
    class KvcompOptunaSweeperConf(OptunaSweeperConf):
        _target_: str = "hydra_plugins.kvcomp_sweeps.KvcompOptunaSweeper"
        n_jobs: int = 1                 # trials launched per batch (parallel only with a parallel launcher)
        max_failure_rate: float = 0.5   # stop once failed trials exceed this fraction of n_trials
        heartbeat_s: float = 30.0       # RUNNING trials with an older heartbeat belong to a dead worker
        compare: Any = None             # {name: sampler config}: run each as its own study (hpo/compare_all)

    ConfigStore.instance().store(group="hydra/sweeper", name="kvcomp_optuna", node=KvcompOptunaSweeperConf,
                                 provider="kvcomp")


try:
    _register()
except ImportError:  # hydra-optuna-sweeper missing: the search path still works
    pass

"""Hydra plugin of kvcomp: ``sweeps/`` on the search path (the Optuna sweeper is ``hydra_plugins.kvcomp_optuna``).

- ``kvcomp-sweeps://<dir>``: a config source that exposes only the ``sweeps`` group of ``<dir>`` (the
  repository root), so ``+sweeps=hpo/tpe`` selects ``sweeps/hpo/tpe.yaml`` from any working directory.
"""

import os
from pathlib import Path

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

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

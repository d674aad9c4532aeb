"""``hydra/sweeper=kvcomp_optuna``: kvcomp's own Hydra sweeper on Optuna 5 (no hydra-optuna-sweeper).

Hydra imports every module under the ``hydra_plugins`` namespace at start-up, so this package stays light:
Optuna and the sweep loop (``kvcomp.sweep.sweeper``) are imported only when the sweeper is instantiated.
Its config (``config.py``) and the samplers ``hydra/sweeper/sampler=<name>`` are registered here.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.kvcomp_optuna.config import register


class KvcompOptunaSweeper(Sweeper):
    """Resumable Optuna sweeps over Hydra's launcher: see ``kvcomp.sweep.sweeper``."""

    def __init__(self, **kwargs: Any) -> None:
        from kvcomp.sweep.sweeper import ResumableOptunaSweeper

        self.sweeper = ResumableOptunaSweeper(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)


register()

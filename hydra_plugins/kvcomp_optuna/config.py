"""Config of ``hydra/sweeper=kvcomp_optuna`` and its samplers (``hydra/sweeper/sampler=<name>``).

Each sampler is a plain ``_target_`` node (Hydra instantiates it), so any keyword of the Optuna class can be
added with ``+hydra.sweeper.sampler.<key>=<value>``; the keys listed are the ones presets set.
"""

# no `from __future__ import annotations`: Hydra executes this module before it is in sys.modules,
# and dataclasses with string annotations look the module up there.

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SAMPLERS: dict[str, dict[str, Any]] = {
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    # multivariate: one joint density over all parameters (Optuna's recommended TPE for correlated ranges)
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None, "n_startup_trials": 10,
            "multivariate": True, "constant_liar": False, "warn_independent_sampling": False},
    # Gaussian-process Bayesian optimisation: the sampler for expensive objectives and few trials
    "gp": {"_target_": "optuna.samplers.GPSampler", "seed": None, "n_startup_trials": 10,
           "deterministic_objective": False, "warn_independent_sampling": False},
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": None, "n_startup_trials": 1,
              "warn_independent_sampling": True},
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": None, "population_size": 50},
    "nsgaiii": {"_target_": "optuna.samplers.NSGAIIISampler", "seed": None, "population_size": 50},
    "qmc": {"_target_": "optuna.samplers.QMCSampler", "seed": None, "scramble": True},
    # the grid of every choice/range in the search space (filled in at sweep time)
    "grid": {"_target_": "optuna.samplers.GridSampler", "_partial_": True, "seed": None},
}


@dataclass
class KvcompOptunaSweeperConf:
    _target_: str = "hydra_plugins.kvcomp_optuna.KvcompOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING
    direction: Any = "minimize"            # minimize | maximize | a list of them (multi-objective)
    storage: str | None = None          # null: sqlite in the sweep dir; journal; any SQLAlchemy URL
    study_name: str | None = None       # null: exp_name
    n_trials: int = 20                     # the study's total of COMPLETE trials
    n_jobs: int = 1                        # trials launched per batch (parallel only with a parallel launcher)
    max_failure_rate: float = 0.5          # stop once failed trials exceed this fraction of n_trials
    heartbeat_s: float = 30.0              # heartbeat interval; a RUNNING trial silent for 3x is a dead worker's
    max_retry: int | None = 3           # times a dead worker's trial is queued again
    compare: Any = None                    # {name: sampler config}: run each as its own study (hpo/compare_all)
    params: dict[str, str] | None = None  # the search space: key -> choice(...)/range(...)/interval(...)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="kvcomp_optuna", node=KvcompOptunaSweeperConf, provider="kvcomp")
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="kvcomp")

"""The sweep loop behind ``hydra/sweeper=kvcomp_optuna``: hydra-optuna-sweeper, made resumable.

- ``n_trials`` is the study's total of COMPLETE trials: a rerun (or a second worker) only runs what is
  missing; trials left RUNNING by a killed worker are failed and their parameters run again.
- a trial that raises, returns nothing or returns NaN is told FAIL and the sweep goes on, until failures
  exceed ``max_failure_rate * n_trials``.
- each trial's run dir is ``<sweep dir>/<trial number>`` (``<sampler>/<trial number>`` under ``compare``).
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, NoReturn

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import Trial, TrialState
from tqdm.auto import tqdm

from kvcomp.sweep import study as st

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna's schema setup is not news


class ResumableOptunaSweeper(OptunaSweeperImpl):
    """OptunaSweeperImpl with RDB storage by default, total ``n_trials``, resume and failure handling."""

    def __init__(self, *, heartbeat_s: float = 30.0, compare: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heartbeat_s = float(heartbeat_s)
        self.compare = dict(compare) if compare else None
        self.seed: int | None = None

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config() + list(arguments)
        dists, fixed = create_params_from_overrides(params_conf)
        if self.search_space_distributions:
            dists = {**self.search_space_distributions, **dists}
        for name in fixed:
            dists.pop(name, None)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage = str(self.storage) if self.storage else st.default_storage(sweep_dir)
        base = str(self.study_name or self.config.get("exp_name") or "kvcomp")
        key = st.command_key(params_conf)  # the search space and every task override
        sweeper_cfg = self.config.hydra.sweeper
        if not self.compare:
            self.seed = sweeper_cfg.sampler.get("seed")
            self._run_study(base, storage, self.sampler, dists, fixed, key, prefix="")
            return
        names = list(self.compare)
        for name in names:
            self.seed = sweeper_cfg.compare[name].get("seed")
            self._run_study(f"{base}-{name}", storage, self.compare[name], dists, fixed, key, prefix=f"{name}/")
        from kvcomp.sweep.report import write_comparison

        write_comparison(storage, {n: f"{base}-{n}" for n in names}, sweep_dir)

    def _run_study(self, name: str, storage: str, sampler: Any, dists: dict[str, Any], fixed: dict[str, Any],
                   key: list[str], prefix: str) -> None:
        n_trials = self.n_trials
        if isinstance(sampler, functools.partial) and sampler.func == optuna.samplers.GridSampler:
            grid = {k: self._to_grid_sampler_choices(d) for k, d in dists.items()}
            sampler = sampler(grid)
            n_trials = min(n_trials, math.prod(len(v) for v in grid.values()))
        directions = self._get_directions()
        try:
            study = optuna.create_study(study_name=name, storage=st.make_storage(storage), sampler=sampler,
                                        directions=directions, load_if_exists=True)
        except (RuntimeError, ValueError) as e:
            abort(str(e))
        have = [d.name.lower() for d in study.directions]
        if have != [d.lower() for d in directions]:
            abort(f"study '{name}' in {storage} optimises {have}, this sweep {directions}; "
                  "use another exp_name or hydra.sweeper.study_name")
        try:
            st.check_command(study, key)
        except ValueError as e:
            abort(str(e))
        st.requeue_stale(study, grace_s=3 * self.heartbeat_s)
        tally = st.counts(study.get_trials(deepcopy=False))
        log.info("Study %s in %s (%s, %s): %d/%d trials complete", name, storage, type(sampler).__name__,
                 directions, tally.complete, n_trials)
        failures = 0
        bar = tqdm(total=n_trials, initial=min(tally.complete, n_trials), desc=name, unit="trial")
        while True:
            tally = st.counts(study.get_trials(deepcopy=False))
            bar.n = min(tally.complete, n_trials)
            bar.refresh()
            todo = n_trials - tally.complete - tally.running
            if todo <= 0:
                break
            if failures > self.max_failure_rate * n_trials:
                bar.close()
                abort(f"{failures} trials failed (more than hydra.sweeper.max_failure_rate={self.max_failure_rate}"
                      f" x n_trials={n_trials}); see failed.json in their run dirs")
            trials = self._claim(study, min(todo, max(1, self.n_jobs)), n_trials)
            if not trials:
                break
            failures += self._launch(study, trials, dists, fixed, prefix, directions)
        bar.close()
        self._write_results(study, prefix)

    def _claim(self, study: optuna.Study, n: int, n_trials: int) -> list[Trial]:
        """Ask ``n`` trials; one that another worker's trials have made surplus is set aside."""
        keep = []
        for _ in range(n):
            t = study.ask()
            study._storage.set_trial_system_attr(t._trial_id, st.OWNER, st.owner())
            if st.claimed_before(study, t.number) >= n_trials:
                study._storage.set_trial_system_attr(t._trial_id, st.SURPLUS, True)
                study.tell(t, state=TrialState.FAIL)
                break
            keep.append(t)
        return keep

    def _launch(self, study: optuna.Study, trials: list[Trial], dists: dict[str, Any], fixed: dict[str, Any],
                prefix: str, directions: list[str]) -> int:
        """Run a batch of trials and tell Optuna each result; returns the number that failed."""
        overrides = []
        for t in trials:
            if self.seed is not None:
                st.reseed(study.sampler, int(self.seed) + t.number)
            overrides.append((*self._configure_trials([t], dists, fixed)[0], f"hydra.sweep.subdir={prefix}{t.number}"))
        try:
            with st.heartbeat(study, trials, self.heartbeat_s):
                returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        except Exception:  # composition error or launcher failure: the config is wrong, not one trial
            for t in trials:
                study.tell(t, state=TrialState.FAIL)
            raise
        failed = 0
        for t, ret in zip(trials, returns):
            study._storage.set_trial_system_attr(t._trial_id, st.RUN_DIR, f"{prefix}{t.number}")
            values, why = trial_values(ret, len(directions))
            if values is None:
                failed += 1
                log.warning("trial %d failed: %s", t.number, why)
                study.tell(t, state=TrialState.FAIL)
            else:
                study.tell(t, values=values)
        return failed

    def _write_results(self, study: optuna.Study, prefix: str) -> None:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            log.warning("study %s has no complete trial", study.study_name)
            return
        if len(study.directions) == 1:
            best = study.best_trial
            res: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "best_params": best.params,
                                   "best_value": best.value, "best_trial": best.number}
            log.info("Best value %s with %s (trial %d)", best.value, best.params, best.number)
        else:
            res = {"name": "optuna", "study_name": study.study_name,
                   "solutions": [{"params": t.params, "values": t.values, "trial": t.number}
                                 for t in study.best_trials]}
            log.info("Pareto front: %d trials", len(study.best_trials))
        out = Path(str(self.config.hydra.sweep.dir)) / prefix
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(res), out / "optimization_results.yaml")


def abort(msg: str) -> NoReturn:
    """Stop the sweep with one ``error:`` line (exit status 1), no traceback."""
    log.error(msg)
    raise SystemExit(f"error: {msg}")


def trial_values(ret: JobReturn, n_objectives: int) -> tuple[list[float] | None, str]:
    """The objective value(s) of a finished job, or ``(None, reason)`` when the trial failed."""
    if ret.status != JobStatus.COMPLETED:
        return None, f"{type(ret._return_value).__name__}: {ret._return_value}"
    v = ret._return_value
    if v is None:
        return None, "the run raised (see its failed.json)"
    vals = list(v) if isinstance(v, list | tuple) or OmegaConf.is_list(v) else [v]
    try:
        out = [float(x) for x in vals]
    except (TypeError, ValueError):
        return None, f"objective must be a number or a list of numbers, got {v!r}"
    if len(out) != n_objectives:
        return None, f"{len(out)} objective value(s) for {n_objectives} direction(s); set objective=[a,b] to match"
    if any(math.isnan(x) for x in out):
        return None, "objective is NaN"
    return out, ""

"""The sweep loop behind ``hydra/sweeper=kvcomp_optuna``: Optuna's ask/tell over Hydra's launcher, resumable.

- the search space is ``hydra.sweeper.params`` plus the command's sweep overrides (``kvcomp.sweep.space``).
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
import signal
import warnings
from pathlib import Path
from typing import Any, NoReturn

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import Trial, TrialState
from tqdm.auto import tqdm

from kvcomp import interrupt
from kvcomp.sweep import space as sp
from kvcomp.sweep import storage as stg
from kvcomp.sweep import study as st

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna's schema setup is not news
DIRECTIONS = ("minimize", "maximize")


class ResumableOptunaSweeper:
    """Runs one study (or one per ``compare`` sampler) to ``n_trials`` COMPLETE trials."""

    def __init__(self, *, sampler: Any, direction: Any, storage: str | None, study_name: str | None,
                 n_trials: int, n_jobs: int, max_failure_rate: float, heartbeat_s: float, max_retry: int | None,
                 compare: Any, params: Any) -> None:
        self.sampler, self.storage, self.study_name = sampler, storage, study_name
        self.directions = [str(d).lower() for d in (direction if OmegaConf.is_list(direction)
                                                     or isinstance(direction, list | tuple) else [direction])]
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad:
            abort(f"hydra.sweeper.direction={bad[0]}: allowed minimize, maximize or a list of them")
        if not 0.0 <= float(max_failure_rate) <= 1.0:
            abort(f"hydra.sweeper.max_failure_rate={max_failure_rate}: allowed 0.0 to 1.0")
        self.n_trials, self.n_jobs, self.max_failure_rate = int(n_trials), int(n_jobs), float(max_failure_rate)
        self.heartbeat_s = float(heartbeat_s)
        self.retry = st.retry_callback(None if max_retry is None else int(max_retry))
        self.compare = dict(compare) if compare else None
        self.params = dict(params) if params else {}
        self.seed: int | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        stop = interrupt.install()  # SIGTERM / Ctrl-C between or after trials: the sweep stops cleanly too
        try:
            with warnings.catch_warnings():  # ask/tell with Optuna's heartbeat and retry callback is intended
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")
                self._sweep(arguments)
        finally:
            stop()

    def _sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        params_conf = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        try:
            dists, fixed = sp.parse(params_conf)
        except ValueError as e:
            abort(str(e))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        spec = stg.resolve(self.storage, sweep_dir)
        try:
            storage = stg.open_storage(spec, self.heartbeat_s, on_stale=self.retry)
        except RuntimeError as e:
            abort(str(e))
        base = str(self.study_name or self.config.get("exp_name") or "kvcomp")
        key = st.command_key(params_conf)  # the search space and every task override
        sweeper_cfg = self.config.hydra.sweeper
        if not self.compare:
            self.seed = sweeper_cfg.sampler.get("seed")
            self._run_study(base, storage, spec, self.sampler, dists, fixed, key, prefix="")
            return
        names = list(self.compare)
        for name in names:
            self.seed = sweeper_cfg.compare[name].get("seed")
            self._run_study(f"{base}-{name}", storage, spec, self.compare[name], dists, fixed, key,
                            prefix=f"{name}/")
        from kvcomp.sweep.report import write_comparison

        write_comparison(storage, {n: f"{base}-{n}" for n in names}, sweep_dir)

    def _run_study(self, name: str, storage: Any, spec: str, sampler: Any, dists: sp.Space, fixed: dict[str, str],
                   key: list[str], prefix: str) -> None:
        n_trials = self.n_trials
        if isinstance(sampler, functools.partial) and sampler.func == optuna.samplers.GridSampler:
            try:
                grid = {k: sp.grid(d) for k, d in dists.items()}
            except ValueError as e:
                abort(str(e))
            sampler = sampler(grid)
            n_trials = min(n_trials, math.prod(len(v) for v in grid.values()))
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                        directions=self.directions, load_if_exists=True)
        except (RuntimeError, ValueError) as e:
            abort(str(e))
        have = [d.name.lower() for d in study.directions]
        if have != self.directions:
            abort(f"study '{name}' in {spec} optimises {have}, this sweep {self.directions}; "
                  "use another exp_name or hydra.sweeper.study_name")
        try:
            st.check_command(study, key)
        except ValueError as e:
            abort(str(e))
        tally = st.counts(study.get_trials(deepcopy=False))
        log.info("Study %s in %s (%s, %s): %d/%d trials complete", name, spec, type(sampler).__name__,
                 self.directions, tally.complete, n_trials)
        failures = 0
        bar = tqdm(total=n_trials, initial=min(tally.complete, n_trials), desc=name, unit="trial")
        while True:
            st.requeue_stale(study, grace_s=3 * self.heartbeat_s, retry=self.retry)
            tally = st.counts(study.get_trials(deepcopy=False))
            bar.n = min(tally.complete, n_trials)
            bar.refresh()
            todo = n_trials - tally.complete - tally.running
            if todo <= 0:
                break
            self._stop_if_asked(study, prefix, bar)
            if failures > self.max_failure_rate * n_trials:
                bar.close()
                abort(f"{failures} trials failed (more than hydra.sweeper.max_failure_rate={self.max_failure_rate}"
                      f" x n_trials={n_trials}); see failed.json in their run dirs")
            trials = self._claim(study, min(todo, max(1, self.n_jobs)), n_trials, dists)
            if not trials:
                break
            failures += self._launch(study, trials, fixed, prefix)
            self._stop_if_asked(study, prefix, bar, after=trials[-1].number)
        bar.close()
        self._write_results(study, prefix)

    def _stop_if_asked(self, study: optuna.Study, prefix: str, bar: Any, after: int | None = None) -> None:
        """Stop the sweep (results written, exit 128 + signal) if SIGTERM / Ctrl-C came that no run acted on:
        during a trial's last sample or between trials."""
        if (sig := interrupt.requested()) is None:
            return
        bar.close()
        self._write_results(study, prefix)
        where = "" if after is None else f" after trial {after} (it finished)"
        log.warning("%s: the sweep stops%s; rerun the command to resume", signal.Signals(sig).name, where)
        raise SystemExit(128 + sig)

    def _claim(self, study: optuna.Study, n: int, n_trials: int, dists: sp.Space) -> list[Trial]:
        """Ask ``n`` trials; one that another worker's trials have made surplus is set aside."""
        keep = []
        for _ in range(n):
            t = study.ask()
            study._storage.set_trial_system_attr(t._trial_id, st.OWNER, st.owner())
            if self.seed is not None:  # trial N draws the same values however (and by whom) it was reached
                st.reseed(study.sampler, int(self.seed) + t.number)
            sp.suggest(t, dists)  # a re-queued trial keeps its parameters
            if st.claimed_before(study, t.number) >= n_trials:
                study._storage.set_trial_system_attr(t._trial_id, st.SURPLUS, True)
                tell(study, t, state=TrialState.FAIL)
                break
            keep.append(t)
        return keep

    def _launch(self, study: optuna.Study, trials: list[Trial], fixed: dict[str, str], prefix: str) -> int:
        """Run a batch of trials and tell Optuna each result; returns the number that failed."""
        overrides = []
        for t in trials:
            for k, v in fixed.items():
                t.set_user_attr(k, v)
            job = [sp.as_override(k, v) for k, v in t.params.items()] + [f"{k}={v}" for k, v in fixed.items()]
            overrides.append((*job, f"hydra.sweep.subdir={prefix}{t.number}"))
        try:
            with st.heartbeat(study, trials, self.heartbeat_s):
                returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        except Exception:  # composition error or launcher failure: the config is wrong, not one trial
            for t in trials:
                tell(study, t, state=TrialState.FAIL)
            raise
        failed = 0
        for t, ret in zip(trials, returns):
            study._storage.set_trial_system_attr(t._trial_id, st.RUN_DIR, f"{prefix}{t.number}")
            values, why = trial_values(ret, len(self.directions))
            if values is None:
                failed += 1
                log.warning("trial %d failed: %s", t.number, why)
                tell(study, t, state=TrialState.FAIL)
            else:
                tell(study, t, values=values)
        return failed

    def _write_results(self, study: optuna.Study, prefix: str) -> None:
        assert self.config is not None
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
        log.info("Watch it: python -m runners.dashboard %s", self.config.hydra.sweep.dir)


def tell(study: optuna.Study, trial: Trial, **kwargs: Any) -> None:
    """``study.tell``; GridSampler calls ``study.stop()`` once its grid is done, which Optuna refuses outside
    ``optimize`` after storing the result: the loop ends on ``n_trials`` (capped at the grid's size) anyway."""
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


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

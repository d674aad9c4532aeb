"""Optuna studies that survive crashes and are shared by several workers.

A study lives in a storage (``kvcomp.sweep.storage``: sqlite in the sweep dir by default, a journal file,
or any SQLAlchemy URL) under a stable name (``exp_name`` unless ``hydra.sweeper.study_name`` is set).
Every trial records its owner (``host:pid``) and a heartbeat (Optuna's own on RDB storages, a trial
attribute on the journal file). A RUNNING trial whose owner is a dead process on this host, or whose
heartbeat is older than the grace period, was left by a killed worker: it is marked FAIL and Optuna's
``RetryHeartbeatStaleTrialCallback`` queues a copy with its parameters (``failed_trial`` names the original).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)
OWNER, BEAT, RUN_DIR = "kvcomp:owner", "kvcomp:heartbeat", "kvcomp:run_dir"
SURPLUS, COMMAND = "kvcomp:surplus", "kvcomp:command"
LEGACY_INTERRUPTED = "kvcomp:interrupted"  # how sweeps made before Optuna's retry callback marked them
IGNORED_OVERRIDES = ("model.device", "logger", "hydra.")  # may differ between workers of one study


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(trial: FrozenTrial) -> bool:
    host, _, pid = str(trial.system_attrs.get(OWNER, "")).rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def is_stale(trial: FrozenTrial, grace_s: float, now: float | None = None) -> bool:
    """A RUNNING trial whose worker is gone: a dead pid on this host, or no kvcomp heartbeat for ``grace_s``
    (storages without Optuna's heartbeat; on RDB storages ``optuna.storages.fail_stale_trials`` decides)."""
    if trial.state != TrialState.RUNNING:
        return False
    host, _, pid = str(trial.system_attrs.get(OWNER, "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not _pid_alive(int(pid))
    beat = trial.system_attrs.get(BEAT)
    if beat is None:
        beat = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return (now or time.time()) - float(beat) > grace_s


class Retry:
    """Optuna's ``RetryHeartbeatStaleTrialCallback``; the queued copy does not inherit the dead worker's
    owner and heartbeat attributes (they would make it look abandoned the moment a worker picks it up)."""

    def __init__(self, max_retry: int | None) -> None:
        with warnings.catch_warnings():  # experimental since Optuna 2.8, still so in 5.1
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.optuna = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k not in (OWNER, BEAT)}
        self.optuna(study, trial)


def retry_callback(max_retry: int | None) -> Retry:
    return Retry(max_retry)


def requeue_stale(study: optuna.Study, grace_s: float, retry: Retry) -> int:
    """Fail the trials left RUNNING by killed workers and queue their parameters again (``retry``);
    Optuna's heartbeat check runs first where the storage has one. Returns how many this call failed."""
    storage = study._storage
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    fail_stale_trials(study)  # RDB: heartbeat older than grace_period -> FAIL + retry (the storage's callback)
    n = len([t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before])
    heartbeat = is_heartbeat_enabled(storage)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not (_dead_here(t) or (not heartbeat and is_stale(t, grace_s))):
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):  # another worker got there first
            continue
        retry(study, study._storage.get_trial(t._trial_id))
        log.warning("trial %d was left RUNNING by a killed worker (%s): marked FAIL, parameters queued again",
                    t.number, t.system_attrs.get(OWNER, "unknown"))
        n += 1
    return n


def interrupted(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials a killed worker left behind (each has a retry naming it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return retried | {t.number for t in trials if t.system_attrs.get(LEGACY_INTERRUPTED)}


@dataclass
class Tally:
    complete: int = 0
    running: int = 0
    failed: int = 0


def counts(trials: Sequence[FrozenTrial]) -> Tally:
    """COMPLETE, RUNNING and genuinely failed trials (interrupted and surplus ones are not counted)."""
    t = Tally()
    gone = interrupted(trials)
    for tr in trials:
        if tr.system_attrs.get(SURPLUS) or tr.number in gone:
            continue
        if tr.state == TrialState.COMPLETE:
            t.complete += 1
        elif tr.state == TrialState.RUNNING:
            t.running += 1
        elif tr.state == TrialState.FAIL:
            t.failed += 1
    return t


def claimed_before(study: optuna.Study, number: int) -> int:
    """COMPLETE or RUNNING trials numbered below ``number``: the slots of ``n_trials`` already taken."""
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < number]
    c = counts(earlier)
    return c.complete + c.running


def command_key(task_overrides: Sequence[str]) -> list[str]:
    """The search space and overrides that define a study (sorted); device and logger may differ per worker."""
    return sorted(o for o in task_overrides if not o.lstrip("+~").startswith(IGNORED_OVERRIDES))


def check_command(study: optuna.Study, key: list[str]) -> None:
    """Remember the command that created a study; refuse to add trials of a different one to it."""
    prev = study.user_attrs.get(COMMAND)
    if prev is None:
        study.set_user_attr(COMMAND, key)
    elif list(prev) != key:
        raise ValueError(
            f"study '{study.study_name}' in this storage was created by other overrides ({' '.join(prev) or 'none'}); "
            f"this command has ({' '.join(key) or 'none'}). Resume with the same overrides, or start a new study "
            "with exp_name=<new> or hydra.sweeper.study_name=<new>")


def reseed(sampler: Any, seed: int) -> None:
    """Seed every numpy RNG of ``sampler`` (and of the samplers inside it) with ``seed``.

    The sweeper seeds each trial with ``sampler seed + trial number``: a resumed sweep or a second worker
    does not replay the first trials' parameters, and trial N draws the same values however it was reached.
    """
    import numpy as np
    from optuna.samplers._lazy_random_state import LazyRandomState

    def walk(obj: Any, depth: int) -> None:
        for v in vars(obj).values():
            if isinstance(v, LazyRandomState):
                v.rng.seed(seed % 2**32)
            elif isinstance(v, np.random.RandomState):
                v.seed(seed % 2**32)
            elif isinstance(v, optuna.samplers.BaseSampler) and depth < 3:
                walk(v, depth + 1)

    walk(sampler, 0)


@contextmanager
def heartbeat(study: optuna.Study, trials: Sequence[Any], every_s: float) -> Iterator[None]:
    """Record a heartbeat for ``trials`` every ``every_s`` seconds while the block runs: Optuna's own
    (``record_heartbeat``) on a storage that has one, a ``kvcomp:heartbeat`` trial attribute otherwise."""
    storage = study._storage
    optuna_beat = isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)
    if optuna_beat:
        every_s = float(storage.get_heartbeat_interval() or every_s)
    stop = threading.Event()

    def record() -> None:
        for t in trials:
            try:
                if optuna_beat:
                    storage.record_heartbeat(t._trial_id)
                else:
                    storage.set_trial_system_attr(t._trial_id, BEAT, time.time())
            except Exception as e:  # a transient storage error must not kill the sweep
                log.debug("heartbeat failed: %s", e)

    def beat() -> None:
        while not stop.wait(every_s):
            record()

    record()
    th = threading.Thread(target=beat, name="kvcomp-heartbeat", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=5)

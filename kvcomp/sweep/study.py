"""Optuna studies that survive crashes and are shared by several workers.

A study lives in RDB storage (``sqlite:///<sweep dir>/optuna.db`` unless ``hydra.sweeper.storage`` names
any SQLAlchemy URL) under a stable name (``exp_name`` unless ``hydra.sweeper.study_name`` is set).
Every trial records its owner (``host:pid``) and a heartbeat; a RUNNING trial whose owner is a dead
process on this host, or whose heartbeat is older than the grace period, was left by a killed worker:
it is marked FAIL (``kvcomp:interrupted``) and its parameters are enqueued so they run again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)
OWNER, BEAT, RUN_DIR = "kvcomp:owner", "kvcomp:heartbeat", "kvcomp:run_dir"
INTERRUPTED, SURPLUS, COMMAND = "kvcomp:interrupted", "kvcomp:surplus", "kvcomp:command"
IGNORED_OVERRIDES = ("model.device", "logger", "hydra.")  # may differ between workers of one study


def default_storage(sweep_dir: str | Path) -> str:
    """``sqlite:///<absolute sweep dir>/optuna.db`` (the directory is created)."""
    path = Path(sweep_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'optuna.db'}"


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """RDB storage for any SQLAlchemy URL; sqlite waits up to 60 s for a lock held by another worker."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    for attempt in range(4):  # workers starting together may race to create the schema
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # bad URL, unreachable server, missing driver
            racing = type(e).__name__ in ("OperationalError", "IntegrityError") or "already exists" in str(e)
            if attempt == 3 or not racing:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise RuntimeError(f"hydra.sweeper.storage={url}: cannot open this storage ({msg})") from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


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


def is_stale(trial: FrozenTrial, grace_s: float, now: float | None = None) -> bool:
    """A RUNNING trial whose worker is gone: a dead pid on this host, or no heartbeat for ``grace_s``."""
    if trial.state != TrialState.RUNNING:
        return False
    host, _, pid = str(trial.system_attrs.get(OWNER, "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not _pid_alive(int(pid))
    beat = trial.system_attrs.get(BEAT)
    if beat is None:
        beat = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return (now or time.time()) - float(beat) > grace_s


def requeue_stale(study: optuna.Study, grace_s: float) -> int:
    """Mark trials left RUNNING by killed workers as FAIL and enqueue their parameters again."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, grace_s):
            continue
        try:
            study._storage.set_trial_system_attr(t._trial_id, INTERRUPTED, True)
            study._storage.set_trial_state(t._trial_id, TrialState.FAIL)
        except RuntimeError:  # another worker got there first
            continue
        if t.params:
            study.enqueue_trial(dict(t.params))
        log.warning("trial %d was left RUNNING by a killed worker (%s): marked FAIL, parameters re-enqueued",
                    t.number, t.system_attrs.get(OWNER, "unknown"))
        n += 1
    return n


@dataclass
class Tally:
    complete: int = 0
    running: int = 0
    failed: int = 0


def counts(trials: Sequence[FrozenTrial]) -> Tally:
    """COMPLETE, RUNNING and genuinely failed trials (interrupted and surplus ones are not counted)."""
    t = Tally()
    for tr in trials:
        if tr.system_attrs.get(SURPLUS) or tr.system_attrs.get(INTERRUPTED):
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

    def walk(obj: Any, depth: int) -> None:
        for v in vars(obj).values():
            if isinstance(v, np.random.RandomState):
                v.seed(seed % 2**32)
            elif isinstance(v, optuna.samplers.BaseSampler) and depth < 3:
                walk(v, depth + 1)

    walk(sampler, 0)


@contextmanager
def heartbeat(study: optuna.Study, trials: Sequence[Any], every_s: float) -> Iterator[None]:
    """Record a heartbeat for ``trials`` every ``every_s`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            for t in trials:
                try:
                    study._storage.set_trial_system_attr(t._trial_id, BEAT, time.time())
                except Exception as e:  # a transient storage error must not kill the sweep
                    log.debug("heartbeat failed: %s", e)

    th = threading.Thread(target=beat, name="kvcomp-heartbeat", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=5)

"""Where a kvcomp study lives: ``hydra.sweeper.storage`` as an Optuna storage.

- ``null`` (default): ``sqlite:///<sweep dir>/optuna.db``
- ``journal``: ``<sweep dir>/optuna.journal``, Optuna's append-only ``JournalStorage`` file: no database
  server, several workers (on one machine, or on a shared file system that honours ``open(O_EXCL)``
  locks) append to it; ``journal:<path>`` puts the file elsewhere (relative paths: under the sweep dir)
- any SQLAlchemy URL (``postgresql+psycopg2://user:pw@host/db``, ``mysql+pymysql://...``, ``sqlite:///x.db``)

RDB storages run Optuna's own heartbeat (``heartbeat_interval``, ``grace_period`` = 3 intervals) and its
``RetryHeartbeatStaleTrialCallback``; the journal file has no heartbeat in Optuna, so kvcomp records one as
a trial attribute there (``kvcomp.sweep.study``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

SQLITE_FILE, JOURNAL_FILE = "optuna.db", "optuna.journal"


def resolve(spec: str | None, sweep_dir: str | Path) -> str:
    """The storage spec with the sweep dir filled in: a SQLAlchemy URL or ``journal:<absolute path>``."""
    path = Path(sweep_dir).resolve()
    if spec is None or str(spec) in ("", "null", "None"):
        return f"sqlite:///{path / SQLITE_FILE}"
    spec = str(spec)
    if spec == "journal" or spec.startswith("journal:"):
        file = Path(spec.partition(":")[2] or JOURNAL_FILE)
        return f"journal:{file if file.is_absolute() else path / file}"
    return spec


def open_storage(spec: str, heartbeat_s: float | None = None,
                 on_stale: Callable[[optuna.Study, Any], None] | None = None) -> BaseStorage:
    """The Optuna storage of a resolved spec (``resolve``); RDB storages get Optuna's heartbeat when
    ``heartbeat_s`` is given. Raises ``RuntimeError`` naming ``hydra.sweeper.storage`` when it cannot open."""
    if spec.startswith("journal:"):
        file = Path(spec.partition(":")[2])
        file.parent.mkdir(parents=True, exist_ok=True)
        lock = JournalFileOpenLock(str(file))  # <file>.lock made with open(O_EXCL): also safe on NFS
        return JournalStorage(JournalFileBackend(str(file), lock_obj=lock))
    if spec.startswith("sqlite:///"):
        Path(spec[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"engine_kwargs": {"connect_args": {"timeout": 60}} if spec.startswith("sqlite")
                              else {"pool_pre_ping": True}}  # sqlite: wait up to 60 s for another worker's lock
    if heartbeat_s:
        beat = max(1, round(heartbeat_s))
        kwargs.update(heartbeat_interval=beat, grace_period=3 * beat, heartbeat_stale_trial_callback=on_stale)
    for attempt in range(4):  # workers starting together may race to create the schema
        try:
            return RDBStorage(spec, **kwargs)
        except Exception as e:  # bad URL, unreachable server, missing driver
            racing = type(e).__name__ in ("OperationalError", "IntegrityError") or "already exists" in str(e)
            if attempt == 3 or not racing:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise RuntimeError(f"hydra.sweeper.storage={spec}: cannot open this storage ({msg})") from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def of_sweep_dir(sweep_dir: str | Path) -> str | None:
    """The resolved storage spec of a sweep dir: its ``optuna.db`` or ``optuna.journal``, else the storage
    its ``multirun.yaml`` names; ``None`` when the dir holds no study."""
    d = Path(sweep_dir)
    if (d / SQLITE_FILE).exists():
        return resolve(None, d)
    if (d / JOURNAL_FILE).exists():
        return resolve("journal", d)
    cfg = d / "multirun.yaml"
    if cfg.exists():
        spec = OmegaConf.select(OmegaConf.load(cfg), "hydra.sweeper.storage", default=None)
        if spec:
            return resolve(str(spec), d)
    return None


def as_storage(storage: str | BaseStorage) -> BaseStorage:
    """A storage object from a resolved spec (``sqlite:///...``, ``journal:<path>``, any URL) or the object."""
    return open_storage(storage) if isinstance(storage, str) else storage

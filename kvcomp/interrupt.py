"""An interrupted run says so: SIGTERM or Ctrl-C (SIGINT) stops it at the next sample boundary.

``install()`` (by ``experiment.run`` around its samples) makes the first signal a request: the sample
being generated finishes, then ``check()`` (called by ``evaluate`` before each sample) raises
``Interrupted`` carrying the finished records. A second signal raises at once. ``mark`` writes what the
run has (``predictions.jsonl`` so far) and ``status.json`` with ``status: interrupted``, and never
``metrics.json``, so sweeps and the report count the run as incomplete. The CLI exits 128 + signal.

A signal that arrives during the last sample (or after it) finds no sample boundary left: the run
finishes and writes its results, and the request is kept, so a sweep stops after that run instead of going
on to the next. The kvcomp Optuna sweeper installs the handlers around the whole sweep (a run's
``install`` inside it shares them), so a signal between trials, or while a finished trial is being told,
is a request too, checked with ``requested()`` before and after each batch; under other sweepers the CLI
stops the next job before it loads the model (``unheeded()``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
STATUS_FILE = "status.json"
_pending: list[int] = []  # signals received while installed
_unheeded: list[int] = []  # a stop asked for too late for the run to act on (it finished)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by ``signum``; ``records`` are the samples of ``stage`` finished before it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.records: list[dict[str, Any]] = []
        self.total: int | None = None
        self.stage = ""


def _handler(signum: int, frame: Any) -> None:
    _pending.append(signum)
    if len(_pending) > 1:
        raise Interrupted(signum)  # asked twice: stop now
    log.warning("%s: stopping after the current sample (send it again to stop at once)",
                signal.Signals(signum).name)


def install() -> Callable[[], None]:
    """Handle SIGINT/SIGTERM as stop requests until the returned function is called (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if signal.getsignal(signal.SIGTERM) is _handler:  # inside a sweep that handles signals: its request is ours
        return lambda: None
    _pending.clear()
    _unheeded.clear()
    old = {s: signal.signal(s, _handler) for s in SIGNALS}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)
        _unheeded[:] = _pending[:1]
        _pending.clear()

    return restore


def check() -> None:
    """Raise ``Interrupted`` if a stop was requested (call between samples)."""
    if _pending:
        raise Interrupted(_pending[0])


def heed() -> None:
    """The run acted on the stop request (raised ``Interrupted``): nothing is left for a sweep to act on."""
    _pending.clear()


def requested() -> int | None:
    """The signal of a stop request no run has acted on yet (None if there is none), while installed."""
    return _pending[0] if _pending else None


def unheeded() -> int | None:
    """The signal of a stop request the last finished run could not act on (None if there was none)."""
    return _unheeded[0] if _unheeded else None


def mark(out: Path, e: Interrupted, records: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """Write ``predictions.jsonl`` (``records``, the samples finished), ``env.json`` and ``status.json``."""
    out.mkdir(parents=True, exist_ok=True)
    status = {"status": "interrupted", "signal": signal.Signals(e.signum).name, "stage": e.stage,
              "samples_done": len(records), "samples_total": e.total}
    lines = "".join(json.dumps({k: v for k, v in r.items() if k != "per_layer"}, ensure_ascii=False) + "\n"
                    for r in records)
    for name, text in (("predictions.jsonl", lines), ("env.json", json.dumps(env, indent=2)),
                       (STATUS_FILE, json.dumps(status, indent=2))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


def describe(out: Path) -> str:
    """'interrupted (SIGTERM) after 3 of 10 samples' from a run dir's status.json ('' if none)."""
    path = out / STATUS_FILE
    if not path.exists():
        return ""
    s = json.loads(path.read_text(encoding="utf-8"))
    where = " in the full-cache baseline pass" if s.get("stage") == "baseline" else ""
    return (f"interrupted ({s.get('signal')}){where} after {s.get('samples_done')} of {s.get('samples_total')} "
            "samples")

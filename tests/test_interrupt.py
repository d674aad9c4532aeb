"""The stop request of ``kvcomp.interrupt``: acted on at a sample boundary, or kept for the sweep when the run
finished first (a signal during the last sample must not be lost: the sweep stops after that run)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from kvcomp import interrupt

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signal handlers are installed from the main thread only")


def test_a_stop_during_the_last_sample_is_kept_for_the_sweep() -> None:
    stop = interrupt.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: a request, the process goes on
        assert interrupt.unheeded() is None  # still the run's to act on
    finally:
        stop()  # the run finished without reaching another sample boundary
    assert interrupt.unheeded() == signal.SIGTERM
    interrupt.install()()  # the next run starts afresh
    assert interrupt.unheeded() is None


def test_a_stop_the_run_acted_on_is_not_kept() -> None:
    stop = interrupt.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(interrupt.Interrupted) as e:
            interrupt.check()
        assert e.value.signum == signal.SIGINT
        interrupt.heed()
    finally:
        stop()
    assert interrupt.unheeded() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

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


def test_a_run_inside_a_sweep_shares_the_sweeps_handlers() -> None:
    """The sweep installs first; a signal between its runs, or after a run restored its handlers (while the
    finished trial is told), is still a request the sweep sees; one inside a run stops the run as before."""
    end_sweep = interrupt.install()
    try:
        end_run = interrupt.install()
        end_run()  # run 0 finished
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # still the sweep's handler
        os.kill(os.getpid(), signal.SIGTERM)  # between runs: no default handler to kill the process
        assert interrupt.requested() == signal.SIGTERM
        end_run = interrupt.install()  # a run started anyway stops at its first sample boundary
        with pytest.raises(interrupt.Interrupted):
            interrupt.check()
        interrupt.heed()
        end_run()
        assert interrupt.requested() is None
    finally:
        end_sweep()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

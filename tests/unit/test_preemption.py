"""PreemptionHandler on one process: flag on signal, handler restoration, requeue exit (agreement
across ranks: tests/multiproc/test_preemption_ranks.py)."""

import os
import signal

import pytest

from distlip.preemption import REQUEUE_EXIT_CODE, REQUEUE_FILE_ENV, PreemptionHandler, exit_for_requeue


def _sentinel(signum, frame):
    """A handler of our own, to check that PreemptionHandler puts it back."""


def test_signal_sets_flag_and_handlers_are_restored():
    previous = {sig: signal.signal(sig, _sentinel) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        with PreemptionHandler() as handler:
            assert not handler.should_stop()
            os.kill(os.getpid(), signal.SIGUSR2)
            assert handler.requested and handler.received == signal.SIGUSR2
            assert handler.should_stop()  # no process group: the local flag
            os.kill(os.getpid(), signal.SIGTERM)
            assert handler.received == signal.SIGUSR2  # the first signal is the one reported
        assert signal.getsignal(signal.SIGUSR2) is _sentinel
        assert signal.getsignal(signal.SIGTERM) is _sentinel
        handler.close()  # idempotent
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)


def test_exit_for_requeue_leaves_marker_and_status(tmp_path, monkeypatch):
    marker = tmp_path / "requeue"
    monkeypatch.setenv(REQUEUE_FILE_ENV, str(marker))
    with pytest.raises(SystemExit) as exited:
        exit_for_requeue()
    assert exited.value.code == REQUEUE_EXIT_CODE == 75
    assert marker.exists()

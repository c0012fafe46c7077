"""PreemptionHandler: flag on signal, agreement across ranks, handler restoration, requeue exit."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from distlip.preemption import (
    REQUEUE_EXIT_CODE,
    REQUEUE_FILE_ENV,
    PreemptionHandler,
    exit_for_requeue,
    ignore_preemption_signals,
)


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


def test_ignore_preemption_signals():
    previous = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    try:
        ignore_preemption_signals(0)
        os.kill(os.getpid(), signal.SIGUSR2)  # would end the process if not ignored
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _agreement_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with PreemptionHandler() as handler:
            stopped_at = None
            for step in range(10):
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGUSR2)
                if handler.should_stop():
                    stopped_at = step
                    break
        result = {"stopped_at": stopped_at, "received": handler.received}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_when_only_one_is_signalled(tmp_path):
    # fork: the children reuse this process's imports (spawn would re-import torch, ~4 s each).
    mp.start_processes(_agreement_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [
        {"stopped_at": 3, "received": None},
        {"stopped_at": 3, "received": int(signal.SIGUSR2)},
    ]

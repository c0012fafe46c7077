"""Cooperative preemption: turn SLURM's warning signals into one agreed stop at a step boundary.

The chain under `slurm/train.sbatch`: 300 s before the time limit SLURM sends USR2 to the batch
shell, which forwards it to the job step; on each node torchrun (`--signals_to_handle` includes
SIGUSR2) passes it to every worker, where `PreemptionHandler` sets a flag. SLURM's own
preemption sends SIGTERM instead, which torchrun passes on the same way. At every step boundary
the trainer calls `should_stop()`, which all-reduces the flag so that all ranks stop after the
same step even if only some of them saw the signal; they commit a checkpoint and call
`exit_for_requeue()`, and the batch shell requeues the job, which resumes with `--resume auto`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h ("temporary failure; retry later"): exactly this meaning, and apart
# from the statuses a run can end with otherwise: 1 (errors, and torchrun reporting any failed
# worker), 2 (usage), 124 (timeout), 126/127 (shell), 128+N (killed by signal N; 137 is OOM/KILL).
REQUEUE_EXIT_CODE = 75
# torchrun and accelerate report any failing worker as status 1, so the status cannot reach the
# batch shell through them; exit_for_requeue() also creates the file this variable names
# (set by slurm/train.sbatch on a shared filesystem), which the batch shell checks.
REQUEUE_FILE_ENV = "DISTLIP_REQUEUE_FILE"
DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionHandler:
    """Records preemption signals in a flag; restores the previous handlers on `close()`.

    Install it in the main thread of every rank before training starts, e.g.
    `with PreemptionHandler() as preemption: ... if preemption.should_stop(): ...`.
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        self.received: int | None = None  # number of the first signal caught, if any
        self._previous: dict[int, Any] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: this runs between two bytecodes of whatever the main thread was doing
        # (maybe inside a print or a collective), so no I/O, locks or communication here.
        if self.received is None:
            self.received = signum

    @property
    def requested(self) -> bool:
        """Whether this process itself caught a preemption signal."""
        return self.received is not None

    def should_stop(self, group: dist.ProcessGroup | None = None) -> bool:
        """Collective when torch.distributed is initialised: True on every rank if any rank caught a signal.

        Call it at every step boundary on every rank of `group`. Costs one 4-byte all-reduce; on
        NCCL the tensor lives on the current CUDA device and reading it waits for the step's
        queued GPU work.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=_collective_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def close(self) -> None:
        """Restore the handlers that were installed before (idempotent)."""
        for sig, previous in self._previous.items():
            # None means the previous handler was not installed from Python: fall back to default.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exit_for_requeue() -> NoReturn:
    """Leave so that the batch script requeues the job; call on every rank after the checkpoint is committed."""
    marker = os.environ.get(REQUEUE_FILE_ENV)
    if marker:
        Path(marker).touch()
    raise SystemExit(REQUEUE_EXIT_CODE)


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    backend = str(dist.get_backend(group))
    # "nccl" only moves CUDA tensors; gloo (also in mixed "cpu:gloo,cuda:nccl") and others take CPU ones.
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

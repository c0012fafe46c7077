"""This process's place in a launched job, and its start and end: the process group, and an
exit that a finished rank cannot turn into a failure. Light on purpose: the CLI imports it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from distlip.config.checks import check_device
from distlip.config.schema import Config
from distlip.distributed import liveness
from distlip.errors import print_error


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from the launcher's environment (torchrun, accelerate)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
        return cls(get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """This rank's device: `train.device`, with `auto` taking a GPU when one is visible."""
    check_device(cfg, local_rank)
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want, local_rank) if want == "cuda" else torch.device(want)


def init_distributed(env: DistEnv, device: torch.device, timeout_s: float = 300.0) -> None:
    """Start the process group (gloo on CPU, NCCL on GPU) when the launcher started several ranks.

    `timeout_s` (`dist.timeout`) bounds every collective, barrier and the rendezvous itself: a
    rank that waits longer on the others fails, and `run_and_exit` names who stopped answering.
    """
    if env.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # Groups made later without a timeout of their own take torch's default (30 min on gloo, 10
    # on NCCL), not the default group's; DeepSpeed makes one for its gradient all-reduce. Make
    # dist.timeout the default of every group of this process.
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    try:
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    except ImportError:
        dist.init_process_group(backend, timeout=timeout)
    liveness.announce(_default_store(), dist.get_rank(), timeout_s)


def _default_store() -> dist.Store:
    """The launcher's key-value store behind the default process group."""
    return distributed_c10d._get_default_store()


def exit_process(status: int) -> NoReturn:
    """End this process with `status`. A launched rank flushes its output, destroys the process
    group and leaves without the interpreter's final teardown: there, now and then (about one
    launch in six here), a distributed worker thread is destroyed while still joinable and the
    C++ runtime aborts the rank (SIGABRT) after it finished, so the launcher reports failure."""
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(status)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_and_exit(main: Callable[[], int]) -> NoReturn:
    """`exit_process(main())`, also for a SystemExit raised inside (preemption's requeue status).

    A collective that fails because another rank stopped answering (timeout, broken connection)
    ends this rank with status 1 and, on the lowest surviving rank, one line naming the lost
    rank and the fix, instead of a traceback per rank.
    """
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        if not (dist.is_available() and dist.is_initialized() and liveness.is_peer_failure(exc)):
            raise
        message = liveness.lost_peer_message(_default_store(), dist.get_rank(), dist.get_world_size(), exc)
        if message:
            print_error(message)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # not destroy_process_group(): the group is broken and tearing it down can hang
    exit_process(status)

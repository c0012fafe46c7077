"""This process's place in a launched job, and its start and end: the process group, and an
exit that a finished rank cannot turn into a failure. Light on purpose: the CLI imports it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from distlip.config import Config
from distlip.config.checks import check_device


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from the launcher's environment (torchrun, accelerate)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls) -> "DistEnv":
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


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Start the process group (gloo on CPU, NCCL on GPU) when the launcher started several ranks."""
    if env.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    except ImportError:
        dist.init_process_group(backend)


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
    """`exit_process(main())`, also for a SystemExit raised inside (preemption's requeue status)."""
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    exit_process(status)

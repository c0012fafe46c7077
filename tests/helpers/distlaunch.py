"""Launching 2-process gloo workers from tests: one torchrun per test module, results per rank."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import HELPERS, ROOT


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    # distlip from this checkout; `helpers` importable by the worker scripts
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_worker(script: str, tmp: Path, nproc: int = 2, timeout: int = 600) -> list:
    """Run tests/helpers/<script> (argv: result prefix, run dir) on `nproc` ranks, within `timeout`
    seconds; each rank's saved results."""
    proc = torchrun([str(HELPERS / script), str(tmp / "res"), str(tmp / "runs")], nproc, timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp / f"res.rank{r}", weights_only=False) for r in range(nproc)]

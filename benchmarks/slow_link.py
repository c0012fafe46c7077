"""Two "hosts" on one machine joined by a bandwidth-limited link (namespaces, veth, `tc tbf`), for timing
communication as it would be between nodes. Needs root (network namespaces).

`slow_link(rate)` creates namespaces dlbench0 / dlbench1 joined by a veth pair (10.77.0.1 and
10.77.0.2) shaped by `tc tbf` on both ends, and always deletes them on exit (which removes the
veth pair too). `two_nodes` runs a script as a real 2-node torchrun job across it, one process
per node (`train_two_nodes`: `distlip train`); gloo binds to the veth (`GLOO_SOCKET_IFNAME`), not
to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from common import ROOT, metrics

NAMESPACES = ("dlbench0", "dlbench1")
VETHS = ("dlveth0", "dlveth1")
ADDRESSES = ("10.77.0.1", "10.77.0.2")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def slow_link(rate: str = "100mbit") -> Iterator[None]:
    if os.geteuid() != 0:
        raise SystemExit("--slow-link needs root (it creates network namespaces); run without it otherwise")
    try:
        for ns in NAMESPACES:
            _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", VETHS[0], "netns", NAMESPACES[0], "type", "veth", "peer", "name", VETHS[1],
             "netns", NAMESPACES[1])
        for ns, veth, addr in zip(NAMESPACES, VETHS, ADDRESSES):
            inside = ("ip", "netns", "exec", ns)
            _run(*inside, "ip", "addr", "add", f"{addr}/24", "dev", veth)
            _run(*inside, "ip", "link", "set", veth, "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
            _run(*inside, "tc", "qdisc", "add", "dev", veth, "root", "tbf", "rate", rate, "burst", "64kb",
                 "latency", "50ms")
        yield
    finally:
        for ns in NAMESPACES:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def two_nodes(python_args: list[str], port: int = 29911, timeout: int = 900) -> list[str]:
    """`python -m torch.distributed.run … <python_args>` as a 2-node job over the slow link (inside
    `slow_link()`), one process per node; each node's output. Raises if either node fails."""
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = []
    try:
        for rank, (ns, veth) in enumerate(zip(NAMESPACES, VETHS)):
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                   "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr", ADDRESSES[0],
                   "--master_port", str(port), *python_args]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, "GLOO_SOCKET_IFNAME": veth},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode not in (0, 1) for p in procs):  # 1: training finished but a cap was exceeded
        raise RuntimeError("2-node job failed:\n" + "\n".join(log[-1500:] for log in logs))
    return logs


def train_two_nodes(out: Path, config: str, overrides: list[str], port: int = 29911,
                    timeout: int = 900) -> list[dict]:
    """`distlip train` as a 2-node job over the slow link (inside `slow_link()`); metrics records."""
    args = ["--config", config, "--out", str(out), "train.progress=false", "train.tensorboard=false", *overrides]
    two_nodes(["-m", "distlip", "train", *args], port, timeout)
    return metrics(out)

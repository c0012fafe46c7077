"""A real 2-node launch: two network namespaces joined by a veth, one `torchrun --nnodes 2` node
in each, gloo bound to the veth. A node that dies (its link cut, then its processes SIGKILLed, as
a host that loses power) or a rank that hangs (SIGSTOP) makes the survivor exit non-zero within
`dist.timeout`, with one line naming the rank and node that stopped answering; relaunching both
nodes with `--resume auto` ends with the same weights as an uninterrupted 2-node run (CPU, fp32).

Four launches of both nodes (reference, killed, relaunched, hung); each takes ~10-20 s.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT
from helpers.netns import Host, TwoHosts, unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

TIMEOUT_S = 20  # dist.timeout of these runs
# A constant learning rate (decay_start=1) makes a run and its resumed copy follow one trajectory.
STEPS = 300
OVERRIDES = [f"train.steps={STEPS}", "train.progress=false", "train.tensorboard=false", "model.d_model=16",
             "model.n_heads=2", "model.context=16", "train.batch_size=8", "train.eval_every=0", "train.log_every=1",
             "optim.decay_start=1.0", "train.save_every=10", "train.keep_last=3", "dist.zero_stage=0",
             "optim.embed=adam", "train.threads=1", f"dist.timeout={TIMEOUT_S}"]  # fmt: skip
LOST = re.compile(r"^error: rank 1 \(node 1, host [^)]*\) stopped answering.*--resume auto.*$", re.M)


class Node:
    """One torchrun node in its namespace; output in `log`."""

    def __init__(self, host: Host, node_rank: int, master: Host, port: int, out: Path, log: Path, *extra: str):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": host.ifname, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1",
               "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
        cmd = host.command([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                            "--node_rank", str(node_rank), "--nproc_per_node", "1",
                            "--master_addr", master.addr, "--master_port", str(port),
                            "--max_restarts", "0", "-m", "distlip", "train", "--config", "configs/smoke.yaml",
                            "--out", str(out), *OVERRIDES, *extra])  # fmt: skip
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def family(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return [*psutil.Process(self.proc.pid).children(recursive=True), psutil.Process(self.proc.pid)]
        return []

    def worker(self) -> psutil.Process:
        """The training process (the launcher's child running distlip)."""
        def is_worker(p) -> bool:
            cmd = " ".join(p.cmdline())
            return "distlip" in cmd and "torch.distributed.run" not in cmd

        return next(p for p in self.family() if is_worker(p))

    def kill(self) -> None:
        """SIGKILL the launcher and its workers at once."""
        family = self.family()
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(family, timeout=30)
        self.proc.wait()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"node did not finish within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")


def launch(hosts: tuple[Host, Host], port: int, out: Path, name: str, *extra: str) -> tuple[Node, Node]:
    return tuple(Node(h, i, hosts[0], port, out, out.parent / f"{name}-node{i}.log", *extra)
                 for i, h in enumerate(hosts))


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return max([json.loads(line)["step"] for line in lines if line.endswith("\n") and '"event"' not in line] or [0])


def wait_until(ready, nodes: tuple[Node, Node], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if any(n.proc.poll() is not None for n in nodes) or time.monotonic() > deadline:
            for n in nodes:
                n.kill()
            logs = "\n".join(n.log.read_text()[-2000:] for n in nodes)
            pytest.fail("the run ended or stalled before the fault:\n" + logs)
        time.sleep(0.02)


def finish_both(nodes: tuple[Node, Node]) -> None:
    for n in nodes:
        assert n.wait(600) == 0, n.log.read_text()[-3000:]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def net():
    with TwoHosts() as pair:
        yield pair


def test_lost_node_fails_fast_by_name_and_relaunch_resumes_bit_exact(net, tmp_path):
    hosts = net.hosts
    port = 29400 + os.getpid() % 500
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    finish_both(launch(hosts, port, ref / "out", "ref"))

    nodes = launch(hosts, port + 1, run / "out", "killed")
    wait_until(lambda: (run / "out" / "latest").exists() and last_step(run / "out") >= 25, nodes)
    # Node 1's host dies: first its link goes silent (no FIN/RST reaches node 0), then its processes.
    net.cut(hosts[1])
    try:
        killed_at = time.monotonic()
        nodes[1].kill()
        status = nodes[0].wait(TIMEOUT_S + 120)
        elapsed = time.monotonic() - killed_at
    finally:
        net.restore(hosts[1])
    log = nodes[0].log.read_text()
    print(f"node 1 lost: node 0 exited with status {status} {elapsed:.1f} s later (dist.timeout={TIMEOUT_S} s)")
    assert status != 0, log[-3000:]
    assert len(LOST.findall(log)) == 1, log[-3000:]
    assert elapsed < TIMEOUT_S + 60, log[-3000:]

    newest = int((run / "out" / "latest").read_text().strip().removeprefix("step_"))
    finish_both(launch(hosts, port + 2, run / "out", "relaunch", "--resume", "auto"))
    events = [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [newest]
    same_weights(run / "out", ref / "out")


def test_hung_rank_is_named(net, tmp_path):
    hosts = net.hosts
    port = 29400 + os.getpid() % 500 + 3
    out = tmp_path / "out"
    out.mkdir()
    nodes = launch(hosts, port, out / "run", "hung")
    wait_until(lambda: last_step(out / "run") >= 5, nodes)
    worker = nodes[1].worker()
    worker.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        status = nodes[0].wait(TIMEOUT_S + 120)
        elapsed = time.monotonic() - stopped_at
    finally:
        nodes[1].kill()
    log = nodes[0].log.read_text()
    print(f"rank 1 hung: node 0 exited with status {status} {elapsed:.1f} s later (dist.timeout={TIMEOUT_S} s)")
    assert status != 0, log[-3000:]
    assert len(LOST.findall(log)) == 1, log[-3000:]
    assert elapsed < TIMEOUT_S + 60, log[-3000:]

"""The per-node launch command of a multi-node job, built from the SLURM environment.

``slurm/train.sbatch`` runs ``python -m distlip.slurm [--launcher L] -- <train args>`` once per
node (``srun --ntasks-per-node=1``); each node reads its own SLURM_NODEID etc. and replaces itself
with torchrun or ``accelerate launch``. ``--dry-run`` prints the command instead.

Rendezvous: the first host of the allocation is the master; the port is derived from the job id
(so jobs sharing a node do not collide, and a requeued job gets the same one) unless MASTER_PORT
is set.

Processes per node: the GPUs SLURM gives each node, or on a CPU-only allocation (no GPUs) one, unless
``--procs-per-node`` says otherwise. The launcher runs under this interpreter (``python -m
torch.distributed.run``, not a ``torchrun`` looked up on PATH), so the job uses the training
environment that started it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distlip.errors import ConfigError, run_command

LAUNCHERS = ("torchrun", "accelerate")
# Ports 15000-29999: below Linux's ephemeral range (32768+), where an outgoing connection could
# already hold the port, and clear of the well-known services.
PORT_BASE = 15000
PORT_SPAN = 15000
# Signals torchrun forwards to its workers: its defaults plus USR2, SLURM's time-limit warning.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
# Seconds torchrun lets workers checkpoint after forwarding a signal before it kills them; below
# the 300 s lead of ``--signal=B:USR2@300`` in slurm/train.sbatch. Passed by environment: torch
# releases older than the setting (2.13 has it) would reject a flag but ignore the variable, and
# then kill after a fixed 30 s.
SHUTDOWN_TIMEOUT_S = 240

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM hostlist: ``"gpu[01-03,07],cpu5"`` -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Several bracket groups in one name expand as a product (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1
    r2n2); numbers keep the zero padding of the range's start.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        parts = re.split(r"\[([^\]]*)\]", item)  # alternating literal, bracket body, literal, ...
        if "[" in "".join(parts[::2]) or "]" in "".join(parts[::2]):
            raise ConfigError(f"malformed SLURM hostlist {hostlist!r}: unbalanced brackets")
        choices = [[part] if i % 2 == 0 else _expand_ranges(part, hostlist) for i, part in enumerate(parts)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ConfigError(f"empty SLURM hostlist {hostlist!r}")
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split on the commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    items.append(hostlist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_ranges(body: str, hostlist: str) -> list[str]:
    values = []
    for piece in body.split(","):
        match = _RANGE.fullmatch(piece.strip())
        if not match:
            raise ConfigError(f"malformed SLURM hostlist {hostlist!r}: bad range {piece!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ConfigError(f"malformed SLURM hostlist {hostlist!r}: range {piece!r} runs backwards")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def master_port(job_id: int) -> int:
    """The rendezvous port of a job: stable across requeues of the same job id."""
    return PORT_BASE + job_id % PORT_SPAN


@dataclass(frozen=True)
class SlurmNode:
    """This node's place in a SLURM allocation."""

    hosts: tuple[str, ...]  # every node of the job, in SLURM_NODEID order
    node_rank: int
    procs_per_node: int  # workers on each node: one per GPU, or as asked on CPU
    job_id: int
    port: int

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @property
    def master_addr(self) -> str:
        return self.hosts[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str], procs_per_node: int | None = None) -> SlurmNode:
        """Read the allocation from SLURM's variables; ConfigError lists every missing one.

        ``procs_per_node`` overrides the worker count per node (default: the node's GPUs, or 1
        on a CPU-only allocation).
        """
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
        gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE") or "0"
        required = {
            "SLURM_JOB_NODELIST": nodelist,
            "SLURM_NNODES": nnodes,
            "SLURM_NODEID": env.get("SLURM_NODEID"),
            "SLURM_JOB_ID": env.get("SLURM_JOB_ID"),
        }
        missing = [name for name, value in required.items() if not value]
        if missing:
            raise ConfigError(f"missing SLURM variables: {', '.join(missing)}; run inside a job step (sbatch/srun)")
        hosts = tuple(expand_hostlist(nodelist))
        node_rank = _integer("SLURM_NODEID", env["SLURM_NODEID"])
        if len(hosts) != _integer("SLURM_NNODES", nnodes):
            raise ConfigError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={nodelist} names {len(hosts)} hosts")
        if not 0 <= node_rank < len(hosts):
            raise ConfigError(f"SLURM_NODEID={node_rank} is outside the job's {len(hosts)} nodes")
        job_id = _integer("SLURM_JOB_ID", env["SLURM_JOB_ID"])
        port = _integer("MASTER_PORT", env["MASTER_PORT"]) if env.get("MASTER_PORT") else master_port(job_id)
        # SLURM_GPUS_PER_NODE may carry a type ("h100:8"); the count is the last field.
        count = _integer("GPUs per node", str(gpus).rsplit(":", 1)[-1])
        procs = procs_per_node if procs_per_node is not None else max(count, 1)
        if procs < 1:
            raise ConfigError(f"processes per node is {procs}: give a positive --procs-per-node")
        return cls(hosts, node_rank, procs, job_id, port)

    def command(self, train_args: Sequence[str], launcher: str = "torchrun") -> list[str]:
        """The exact command that starts this node's share of the workers."""
        endpoint = [self.master_addr, str(self.port)]
        grace = ["env", f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT_S}"]
        if launcher == "torchrun":
            return [
                *grace,
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes", str(self.num_nodes),
                "--node_rank", str(self.node_rank),
                "--nproc_per_node", str(self.procs_per_node),
                "--rdzv_backend", "c10d",
                "--rdzv_endpoint", ":".join(endpoint),
                "--rdzv_id", str(self.job_id),
                "--signals_to_handle", FORWARDED_SIGNALS,
                *train_args,
            ]  # fmt: skip
        if launcher == "accelerate":
            # accelerate runs torchrun's agent in-process with torchrun's option defaults, which
            # PET_<OPTION> variables override; it has no flag of its own for the signals.
            return [
                *grace,
                f"PET_SIGNALS_TO_HANDLE={FORWARDED_SIGNALS}",
                sys.executable, "-m", "accelerate.commands.launch",
                "--num_machines", str(self.num_nodes),
                "--machine_rank", str(self.node_rank),
                "--main_process_ip", endpoint[0],
                "--main_process_port", endpoint[1],
                "--num_processes", str(self.num_nodes * self.procs_per_node),
                "--use_deepspeed",
                "--deepspeed_multinode_launcher", "standard",
                *train_args,
            ]  # fmt: skip
        raise ConfigError(f"unknown launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")


def launch_command(
    env: Mapping[str, str],
    train_args: Sequence[str],
    launcher: str = "torchrun",
    procs_per_node: int | None = None,
) -> list[str]:
    """The per-node launch command for the allocation described by ``env`` (e.g. ``os.environ``)."""
    return SlurmNode.from_env(env, procs_per_node).command(train_args, launcher)


def _integer(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distlip.slurm [--dry-run] [--launcher L] [--procs-per-node N] -- <train args>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m distlip.slurm",
        description="Start this node's workers of a SLURM job (or print the command with --dry-run).",
        epilog="Everything after -- is the training command, e.g. -- -m distlip train --config c.yaml",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    parser.add_argument(
        "--procs-per-node", type=int, help="workers per node (default: the node's GPUs, or 1 without GPUs)"
    )
    return run_command(_launch, parser.parse_args(own), train_args)


def _launch(args: argparse.Namespace, train_args: list[str]) -> int:
    """Print the node's launch command (`--dry-run`) or become it."""
    if not train_args:
        raise ConfigError("no training command: put it after --, e.g. -- -m distlip train --config c.yaml")
    node = SlurmNode.from_env(os.environ, args.procs_per_node)
    command = node.command(train_args, args.launcher)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    print(
        f"[distlip.slurm] node {node.node_rank}/{node.num_nodes} ({socket.gethostname()}): {shlex.join(command)}",
        file=sys.stderr,
        flush=True,
    )
    os.execvp(command[0], command)  # the launcher becomes the SLURM task and so receives its signals
    return 127  # not reached: execvp only returns by raising


if __name__ == "__main__":
    sys.exit(main())

"""A one-node SLURM cluster on this machine, for tests: munged, slurmctld and slurmd as root.

Everything (munge key and socket, `slurm.conf`, state, spool, logs) lives under one directory;
the daemons run in the foreground as children of the test and stop with it. Client commands
(`sbatch`, `squeue`, `scancel`, `scontrol`) find the cluster through `SLURM_CONF`, which `env()`
sets. Needs Debian's `slurmctld slurmd munge` (`make ci-deps` installs them) and root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def unavailable_reason() -> str | None:
    """Why no cluster can start here (not root, packages missing), or None."""
    if os.geteuid() != 0:
        return "a real SLURM cluster needs root (slurmd runs jobs as their user)"
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): run `make ci-deps` as root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """`with SlurmCluster(tmp) as cluster:` one node named after this host, partition `cpu`."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: list[subprocess.Popen] = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment in which the client commands talk to this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def _write_files(self) -> None:
        munge = self.root / "munge"
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "plugstack.conf").write_text("")
        r = self.root
        self.conf.write_text(
            "\n".join([
                "ClusterName=distliptest",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # A requeued job waits out its old credential's lifetime before it may start
                # again (120 s by default; it shows as Reason=BeginTime): 10 s here.
                f"AuthInfo=socket={self.munge_socket},cred_expire=10",
                f"StateSaveLocation={r / 'state'}",
                f"SlurmdSpoolDir={r / 'spool'}",
                f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                f"SlurmdPidFile={r / 'slurmd.pid'}",
                f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                f"PlugStackConfig={r / 'plugstack.conf'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SchedulerType=sched/builtin",
                "SchedulerParameters=sched_interval=1",  # start a requeued job as soon as it may
                "JobRequeue=1",
                "ReturnToService=2",
                "MpiDefault=none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "JobAcctGatherType=jobacct_gather/none",
                "MinJobAge=600",
                "KillWait=10",
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ])
        )  # fmt: skip

    def _start(self, args: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - lives as long as the daemon
        self._procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env()))

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_files()
        munge = self.root / "munge"
        self._start([_binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
                    "munged")  # fmt: skip
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self._start([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._start([_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd")
        self._wait(self._node_idle, timeout, "the node did not become idle")
        return self

    def _node_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(), capture_output=True, text=True)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:.0f} s: {self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*")))

    def stop(self) -> None:
        """Cancel what is left and stop the daemons (slurmd first, so that it kills its jobs)."""
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env(), capture_output=True, timeout=30)
        for proc in reversed(self._procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

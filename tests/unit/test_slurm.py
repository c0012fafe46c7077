"""distlip.slurm and slurm/train.sbatch: hostlists, per-node commands, dry run, requeue, USR2 forwarding."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distlip import preemption
from distlip.errors import ConfigError
from distlip.slurm import SHUTDOWN_TIMEOUT_S, expand_hostlist, launch_command, main, master_port

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "train.sbatch"
TRAIN = ["-m", "distlip", "train", "--config", "c.yaml"]
JOB_ID = 123456


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("node-[1-2]", ["node-1", "node-2"]),
        ("single", ["single"]),
        ("a1,b[8-10],c", ["a1", "b8", "b9", "b10", "c"]),
        ("r[1-2]n[09-10]", ["r1n09", "r1n10", "r2n09", "r2n10"]),
        ("gpu[007]", ["gpu007"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["gpu[1-", "gpu1-3]", "gpu[3-1]", "gpu[a-b]", ""])
def test_expand_hostlist_rejects_malformed(hostlist):
    with pytest.raises(ConfigError, match="hostlist"):
        expand_hostlist(hostlist)


def two_node_env(node_id: int, **extra: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": str(node_id),
        "SLURM_GPUS_ON_NODE": "4",
    }
    return env | extra


@pytest.mark.parametrize("node_id", [0, 1])
def test_torchrun_command_per_node(node_id):
    port = master_port(JOB_ID)
    assert 15000 <= port < 30000
    assert launch_command(two_node_env(node_id), TRAIN) == [
        "env", f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT_S}",
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2",
        "--node_rank", str(node_id),
        "--nproc_per_node", "4",
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"gpu07:{port}",
        "--rdzv_id", str(JOB_ID),
        "--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2",
        *TRAIN,
    ]  # fmt: skip


@pytest.mark.parametrize("node_id", [0, 1])
def test_accelerate_command_per_node(node_id):
    env = two_node_env(node_id, SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:4", MASTER_PORT="29400")
    command = launch_command(env, TRAIN, launcher="accelerate")
    assert command[:3] == [
        "env", f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT_S}",
        "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
    ]  # fmt: skip
    assert command[3:] == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_machines", "2",
        "--machine_rank", str(node_id),
        "--main_process_ip", "gpu07",
        "--main_process_port", "29400",
        "--num_processes", "8",
        "--use_deepspeed",
        "--deepspeed_multinode_launcher", "standard",
        *TRAIN,
    ]  # fmt: skip


def test_environment_errors_name_the_problem():
    with pytest.raises(ConfigError, match="missing SLURM variables: SLURM_NNODES, SLURM_NODEID;"):
        launch_command({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a"}, TRAIN)
    with pytest.raises(ConfigError, match="SLURM_NNODES=3 but SLURM_JOB_NODELIST=gpu\\[07-08\\] names 2 hosts"):
        launch_command(two_node_env(0, SLURM_NNODES="3"), TRAIN)
    with pytest.raises(ConfigError, match="unknown launcher 'mpirun'"):
        launch_command(two_node_env(0), TRAIN, launcher="mpirun")
    assert launch_command(two_node_env(0), TRAIN, procs_per_node=2)[10] == "2"
    with pytest.raises(ConfigError, match="processes per node is 0"):
        launch_command(two_node_env(0), TRAIN, procs_per_node=0)


@pytest.mark.parametrize("gpus", [{}, {"SLURM_GPUS_ON_NODE": "0"},
                                  {"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "0"}])
def test_cpu_only_allocation_runs_one_process_per_node_or_as_asked(gpus):
    env = {k: v for k, v in two_node_env(0).items() if k != "SLURM_GPUS_ON_NODE"} | gpus
    command = launch_command(env, TRAIN)
    assert command[command.index("--nproc_per_node") + 1] == "1"
    command = launch_command(env, TRAIN, procs_per_node=3)
    assert command[command.index("--nproc_per_node") + 1] == "3"


def test_cli_dry_run_prints_command_or_explains(monkeypatch, capsys):
    for name, value in two_node_env(1).items():
        monkeypatch.setenv(name, value)
    assert main(["--dry-run", "--launcher", "torchrun", "--", *TRAIN]) == 0
    assert " -m torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 4 " in capsys.readouterr().out
    assert main(["--dry-run"]) == 2
    assert "no training command" in capsys.readouterr().err
    monkeypatch.delenv("SLURM_NODEID")
    assert main(["--dry-run", "--", *TRAIN]) == 2
    assert "missing SLURM variables: SLURM_NODEID" in capsys.readouterr().err


# ---------------------------------------------------------------- slurm/train.sbatch


def test_sbatch_syntax_directives_and_shared_constants():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    for directive in ("--ntasks-per-node=1", "--gpus-per-node=", "--signal=B:USR2@300", "--requeue",
                      "--open-mode=append", "--output=logs/%x-%j.out"):  # fmt: skip
        assert f"#SBATCH {directive}" in text
    assert f"REQUEUE_EXIT_CODE={preemption.REQUEUE_EXIT_CODE}\n" in text
    assert f"export {preemption.REQUEUE_FILE_ENV}=" in text
    assert SHUTDOWN_TIMEOUT_S < 300  # workers must finish before the time limit the signal warns of


def write_stubs(bin_dir: Path, names: dict[str, str]) -> None:
    bin_dir.mkdir()
    for name, body in names.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)


# srun stand-in: run the step once per node with that node's SLURM_NODEID (exec when there is one
# node, so that signals sent to "srun" reach the launcher as srun's forwarding would).
SRUN = """while [[ $1 == -* ]]; do shift; done
if (( SLURM_NNODES == 1 )); then SLURM_NODEID=0 exec "$@"; fi
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit; done
"""
SCONTROL = 'echo "$*" >>"$SCONTROL_LOG"\n'


def sbatch_env(tmp_path: Path, nodes: int, **extra: str) -> dict[str, str]:
    hosts = "gpu[07-08]" if nodes == 2 else "localhost"
    return {
        # Not the training environment's bin/: the launcher must come from PYTHON, not from PATH.
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "distlip",
        "SLURM_JOB_NODELIST": hosts,
        "SLURM_NNODES": str(nodes),
        "SLURM_GPUS_ON_NODE": "1" if nodes == 1 else "4",
        "SLURM_SUBMIT_DIR": str(REPO),
        "OUTPUT_DIR": str(tmp_path / "run"),
        "CONFIG": "configs/test.yaml",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def test_sbatch_dry_run_prints_every_nodes_command(tmp_path):
    write_stubs(tmp_path / "bin", {"srun": SRUN, "scontrol": SCONTROL})
    env = sbatch_env(tmp_path, nodes=2, DRY_RUN="1", LAUNCHER="torchrun")
    done = subprocess.run(["bash", str(SBATCH), "train.steps=100"], env=env, capture_output=True, text=True, check=True)
    launcher = f"env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240 {sys.executable} -m torch.distributed.run "
    lines = [line for line in done.stdout.splitlines() if line.startswith(launcher)]
    assert len(lines) == 2
    for node_id, line in enumerate(lines):
        assert f"--node_rank {node_id} " in line
        assert f"--rdzv_endpoint gpu07:{master_port(4242)} " in line
        assert line.endswith(f"-m distlip train --config configs/test.yaml --out {tmp_path}/run "
                             "train.resume=auto train.steps=100")
    assert re.search(r"^\+ scontrol requeue 4242 ", done.stdout, re.M)
    assert ("train.sbatch: a node that dies or hangs ends the step within "
            "dist.timeout=<from configs/test.yaml, default 300> s") in done.stdout
    env["DIST_TIMEOUT"] = "120"
    done = subprocess.run(["bash", str(SBATCH), "train.steps=100"], env=env, capture_output=True, text=True, check=True)
    assert "ends the step within dist.timeout=120 s" in done.stdout
    assert all(line.endswith("train.resume=auto dist.timeout=120 train.steps=100")
               for line in done.stdout.splitlines() if line.startswith(launcher))
    assert not (tmp_path / "scontrol.log").exists()  # printed, not run
    assert not (tmp_path / "run").exists()


def usr2_when_ready(batch: subprocess.Popen, ready: Path, timeout: float) -> str:
    """Send USR2 to the batch shell once `ready` exists; its whole output once it has ended."""
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            assert batch.poll() is None and time.monotonic() < deadline, batch.stdout.read()
            time.sleep(0.05)
        batch.send_signal(signal.SIGUSR2)
        return batch.communicate(timeout=timeout)[0]
    finally:
        batch.kill()


@pytest.mark.parametrize(
    "launcher_body, requeued, status",
    [
        ('touch "$DISTLIP_REQUEUE_FILE"; exit 1\n', True, 0),  # torchrun masks the workers' 75 as 1
        ("exit 75\n", True, 0),
        ("exit 0\n", False, 0),
        ("exit 3\n", False, 3),
    ],
)
def test_sbatch_requeues_only_when_training_asks(tmp_path, launcher_body, requeued, status):
    # The job step stands in for srun -> launcher -> workers: only its exit status and file matter.
    write_stubs(tmp_path / "bin", {"srun": launcher_body, "scontrol": SCONTROL})
    done = subprocess.run(["bash", str(SBATCH)], env=sbatch_env(tmp_path, nodes=1), capture_output=True, text=True)
    assert done.returncode == status, done.stdout + done.stderr
    log = tmp_path / "scontrol.log"
    assert (log.read_text() == "requeue 4242\n") if requeued else not log.exists()
    assert not (tmp_path / "run" / ".requeue-4242").exists()


def test_usr2_during_start_up_requeues(tmp_path):
    """A warning before the workers catch USR2 kills the step (status 1 or 128+12): still requeued."""
    ready = tmp_path / "ready"
    write_stubs(tmp_path / "bin", {"srun": f'touch "{ready}"; exec sleep 60\n', "scontrol": SCONTROL})
    batch = subprocess.Popen(["bash", str(SBATCH)], env=sbatch_env(tmp_path, nodes=1), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out = usr2_when_ready(batch, ready, timeout=30)
    assert batch.returncode == 0, out
    assert "preemption warning arrived before training could checkpoint" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


def make_lock(extensions: Path, minutes_old: float) -> Path:
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    stamp = time.time() - 60 * minutes_old
    os.utime(lock, (stamp, stamp))
    return lock


def test_stale_build_lock_in_the_jobs_own_extensions_dir_is_removed_with_one_line(tmp_path):
    write_stubs(tmp_path / "bin", {"srun": 'echo "ext=$TORCH_EXTENSIONS_DIR"\n', "scontrol": SCONTROL})
    lock = make_lock(tmp_path / "run" / "torch_extensions", minutes_old=0)
    dry = subprocess.run(["bash", str(SBATCH)], env=sbatch_env(tmp_path, nodes=1, DRY_RUN="1"), capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert f"stale DeepSpeed build lock {lock} (0 min old, left by a killed build): a real run removes it" in dry.stdout
    assert lock.exists()
    done = subprocess.run(["bash", str(SBATCH)], env=sbatch_env(tmp_path, nodes=1), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line for line in done.stdout.splitlines() if str(lock) in line] == [
        next(line for line in done.stdout.splitlines() if "removed stale DeepSpeed build lock" in line)
    ]
    assert f"ext={tmp_path / 'run' / 'torch_extensions'}" in done.stdout  # per job, survives requeues
    assert not lock.exists()


def test_build_lock_in_a_shared_extensions_dir_is_removed_only_when_old(tmp_path):
    write_stubs(tmp_path / "bin", {"srun": "exit 0\n", "scontrol": SCONTROL})
    shared = tmp_path / "shared_extensions"
    lock = make_lock(shared, minutes_old=5)
    env = sbatch_env(tmp_path, nodes=1, TORCH_EXTENSIONS_DIR=str(shared))
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, check=True)
    assert f"DeepSpeed build lock {lock} is 5 min old: another job may be building" in done.stdout
    assert lock.exists()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, check=True)
    assert f"removed stale DeepSpeed build lock {lock} (60 min old" in done.stdout
    assert not lock.exists()


WORKER = """import os, sys, time
from pathlib import Path
from distlip.preemption import PreemptionHandler, exit_for_requeue
assert sys.argv[-1] == "train.resume=auto", sys.argv
with PreemptionHandler() as handler:
    Path(os.environ["READY_FILE"]).touch()
    while not handler.should_stop():
        time.sleep(0.05)
    time.sleep(0.5)  # stands in for writing the checkpoint: the launcher must not kill us meanwhile
    exit_for_requeue()
"""


@pytest.mark.slow
def test_usr2_to_batch_shell_reaches_worker_through_real_torchrun(tmp_path):
    """batch shell -> (srun) -> distlip.slurm -> torchrun -> worker, then scontrol requeue."""
    write_stubs(tmp_path / "bin", {"srun": SRUN, "scontrol": SCONTROL})
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as sock:  # a free rendezvous port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ready = tmp_path / "ready"
    env = sbatch_env(tmp_path, nodes=1, TRAIN_ENTRY=str(tmp_path / "worker.py"), READY_FILE=str(ready),
                     MASTER_PORT=str(port))  # fmt: skip
    batch = subprocess.Popen(["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    out = usr2_when_ready(batch, ready, timeout=60)
    assert batch.returncode == 0, out
    assert "USR2: time limit near" in out
    assert "requeueing job 4242" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


def test_distlip_slurm_cmd_runs_distlip_slurm(monkeypatch, capsys):
    from distlip.cli import main as distlip_main

    env = {"SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_GPUS_ON_NODE": "8"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert distlip_main(["slurm-cmd", "--dry-run", "--", *TRAIN]) == 0
    assert capsys.readouterr().out.split() == launch_command(env, TRAIN)

"""slurm/train.sbatch under a real SLURM (munged, slurmctld, slurmd on this machine, as root).

One CPU node, no GPUs: a 2-process smoke run is preempted (`scancel --signal=USR2 --batch`) once
during start-up and once during training, is requeued both times, resumes from the step it
checkpointed, and ends with the same weights as an uninterrupted job. The extensions directory
holds a build lock left by a killed DeepSpeed build; the job must report and remove it, not hang.
The launcher must come from the interpreter PYTHON names: the venv is not on the job's PATH.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT
from helpers.slurm_cluster import SlurmCluster, unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

# A constant learning rate makes every run a prefix of the same trajectory; enough steps that the
# run is still training when the second warning lands (it travels scancel -> slurmctld -> slurmd
# -> batch shell -> srun -> torchrun -> workers).
STEPS = 200
OVERRIDES = [f"train.steps={STEPS}", "train.progress=false", "train.tensorboard=false", "model.d_model=16",
             "model.n_heads=2", "model.context=16", "train.batch_size=8", "train.eval_every=0", "train.log_every=1",
             "optim.decay_start=1.0", "train.save_every=50", "dist.zero_stage=0", "optim.embed=adam"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def extensions_with_stale_lock() -> Path:
    """This environment's DeepSpeed build cache (kept between runs: the op builds once), holding
    the lock a build killed two hours ago left behind. Not a cache other environments share:
    their builds could be waiting on that path."""
    extensions = Path(sys.prefix) / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - 7200, time.time() - 7200))
    return extensions


def submit(cluster: SlurmCluster, tmp: Path, name: str, extensions: Path) -> tuple[int, Path, Path]:
    out, log = tmp / name, tmp / f"{name}.log"
    env = cluster.env({
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",  # no venv: PYTHON alone names the training environment
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONPATH": str(ROOT),
        "PYTHON": sys.executable,
        "CONFIG": "configs/smoke.yaml",
        "OUTPUT_DIR": str(out),
        "PROCS_PER_NODE": "2",
        "TORCH_EXTENSIONS_DIR": str(extensions),
        "OMP_NUM_THREADS": "1",
        "TORCH_COMPILE_DISABLE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    })  # fmt: skip
    cmd = ["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--gpus-per-node=0",
           f"--cpus-per-task={cluster.cpus}", "--time=30", f"--output={log}", str(ROOT / "slurm" / "train.sbatch"),
           *OVERRIDES]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().split(";")[0]), out, log


def job_info(cluster: SlurmCluster, job: int) -> dict[str, str]:
    done = subprocess.run(["scontrol", "show", "job", str(job)], env=cluster.env(), capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def wait_for(what: str, ready, cluster: SlurmCluster, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{read(log)[-4000:]}\n{cluster.logs()[-3000:]}")
        time.sleep(0.1)


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return max([json.loads(line)["step"] for line in lines if line.endswith("\n") and '"event"' not in line] or [0])


def finished(cluster: SlurmCluster, job: int) -> bool:
    return job_info(cluster, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def usr2(cluster: SlurmCluster, job: int) -> None:
    subprocess.run(["scancel", "--signal=USR2", "--batch", str(job)], env=cluster.env(), check=True, timeout=30)


def wait_for_requeue(cluster: SlurmCluster, job: int, restarts: int, log: Path) -> None:
    """Wait until the job has been requeued `restarts` times and runs again."""

    def running_again():
        info = job_info(cluster, job)
        return info.get("Restarts") == str(restarts) and info.get("JobState") in ("RUNNING", "COMPLETED")

    wait_for(f"requeue number {restarts}", running_again, cluster, log)


def test_preempted_twice_requeues_and_ends_like_an_uninterrupted_job(cluster, tmp_path):
    extensions = extensions_with_stale_lock()
    lock = extensions / "deepspeed_shm_comm" / "lock"
    ref_job, ref, ref_log = submit(cluster, tmp_path, "reference", extensions)
    job, run, log = submit(cluster, tmp_path, "preempted", extensions)  # pending until the reference ends

    wait_for("the reference job", lambda: finished(cluster, ref_job), cluster, ref_log)
    assert job_info(cluster, ref_job)["JobState"] == "COMPLETED", read(ref_log)
    assert f"removed stale DeepSpeed build lock {lock} (120 min old, left by a killed build)" in read(ref_log)

    # 1: during start-up, once the step runs but before the first training step.
    wait_for("the first attempt's step", lambda: "[distlip.slurm] node 0/1" in read(log), cluster, log)
    assert not (run / "metrics.jsonl").exists()
    usr2(cluster, job)
    wait_for_requeue(cluster, job, 1, log)
    assert "preemption warning arrived before training could checkpoint" in read(log)

    # 2: during training.
    wait_for("training steps", lambda: last_step(run) >= 5, cluster, log)
    usr2(cluster, job)
    wait_for_requeue(cluster, job, 2, log)
    wait_for("the job to end", lambda: finished(cluster, job), cluster, log)
    text = read(log)
    info = job_info(cluster, job)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "2"), text
    assert [int(n) for n in re.findall(r"train\.sbatch: job \d+ attempt (\d+) ", text)] == [1, 2, 3]
    saved = int(re.search(r"preemption signal: checkpoint of step (\d+) committed", text).group(1))
    assert 5 <= saved < STEPS, text
    assert f"training checkpointed for preemption; requeueing job {job}" in text
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events if e.get("event") in ("start", "resume", "preempted")] == [
        ("start", 0), ("preempted", saved), ("resume", saved)]  # fmt: skip
    wa, wb = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name

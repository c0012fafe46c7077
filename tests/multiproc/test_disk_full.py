"""A full disk loses nothing, a read-only output directory is refused before training.

Each test mounts its own small tmpfs (root only): the run's directory really runs out of space
(or cannot be written), as a cluster's scratch quota does.
"""

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distlip.checkpoint.store import CheckpointStore
from distlip.cli import main as cli
from distlip.errors import CheckpointError

from helpers import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

STEPS = 30
COMMON = ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_heads=2",
          "model.context=16", "train.batch_size=8", "train.eval_every=0", "train.log_every=1",
          "optim.decay_start=1.0", "train.save_every=10", "train.keep_last=3", "train.threads=1"]  # fmt: skip


def train(out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(ROOT / "configs/smoke.yaml"), "--out", str(out), *COMMON, *extra]


def mount_tmpfs(path: Path, size: int, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True, capture_output=True)


@pytest.fixture
def mounts():
    mounted: list[Path] = []
    yield mounted
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def checkpoint_bytes(path: Path) -> int:
    return sum(f["bytes"] for f in json.loads((path / "manifest.json").read_text())["files"])


def test_a_full_disk_keeps_the_previous_checkpoint_and_resume_is_exact(tmp_path, mounts, capsys):
    torch.set_num_threads(1)
    ref = tmp_path / "ref"
    assert cli(train(ref, f"train.steps={STEPS}")) == 0
    size = checkpoint_bytes(ref / "step_000010")
    capsys.readouterr()

    # Room for one checkpoint and the logs, not for a second beside it.
    disk = tmp_path / "disk"
    mount_tmpfs(disk, (int(size * 1.6) // 4096 + 1) * 4096)
    mounts.append(disk)
    run = disk / "run"
    assert cli(train(run, f"train.steps={STEPS}")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    prefix = f"error: no space for checkpoint step_000020 in {run}: it needs about "
    assert lines[0].startswith(prefix), lines[0]
    found = re.search(r"needs about ([\d,]+) bytes and ([\d,]+) are free", lines[0])
    need, free = (int(n.replace(",", "")) for n in found.groups())
    assert need >= size > free
    assert lines[0].endswith("then resume with --resume auto (step_000010 is still the latest checkpoint, intact)")
    store = CheckpointStore(run)
    assert (run / "latest").read_text() == "step_000010"
    assert [p.name for p in store.tag_dirs()] == ["step_000010"]  # nothing torn left behind
    assert store.problem(run / "step_000010") is None  # sizes and SHA-256 verify

    # Given space, --resume auto continues from step 10 and ends where the uninterrupted run did.
    subprocess.run(["mount", "-o", f"remount,size={size * 8}", str(disk)], check=True)
    assert cli(train(run, f"train.steps={STEPS}", "--resume", "auto")) == 0
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [10]
    a, b = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_write_that_runs_out_of_space_is_discarded(tmp_path, mounts):
    """When the estimate lets a save start but the disk fills during the write, the torn
    directory is removed and the error names the directory and the bytes."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, 64 * 4096)
    mounts.append(disk)
    store = CheckpointStore(disk / "run")
    path = store.begin(1)
    (path / "distlip_rank0.pt").write_bytes(b"x" * 4096)
    store.commit(1)
    path = store.begin(2)  # the estimate (the previous checkpoint: 4 KiB) fits
    failure = None
    try:
        with open(path / "distlip_rank0.pt", "wb") as handle:
            handle.write(b"x" * (64 * 4096))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        failure = err
    assert failure is not None and failure.errno == errno.ENOSPC
    with pytest.raises(CheckpointError) as raised:
        store.commit(2, failure=failure)
    message = str(raised.value)
    assert message.startswith(f"no space for checkpoint step_000002 in {disk / 'run'}: it needs about ")
    assert message.endswith("(step_000001 is still the latest checkpoint, intact)") and "\n" not in message
    assert [p.name for p in store.tag_dirs()] == ["step_000001"]
    assert (disk / "run" / "latest").read_text() == "step_000001"
    assert store.resolve("auto").step == 1


def test_read_only_output_directory_is_refused_before_training(tmp_path, mounts, capsys):
    disk = tmp_path / "ro"
    mount_tmpfs(disk, 1 << 20, "ro")
    mounts.append(disk)
    assert cli(train(disk / "run", "train.steps=5")) == 2
    err = capsys.readouterr().err
    assert err == (f"error: output directory {disk / 'run'} is not writable (Read-only file system): choose another "
                   "--out (train.out), or make it writable\n")
    assert not (disk / "run").exists()

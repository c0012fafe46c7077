"""CheckpointStore: commit/rotation, torn and corrupt checkpoints, resolve rules, 2-rank commit."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from distlip.checkpoint.store import MANIFEST, CheckpointStore, CheckpointWarning, tag_for
from distlip.errors import CheckpointError

MODEL = "mp_rank_00_model_states.pt"


def save(store: CheckpointStore, step: int) -> Path:
    """One single-rank checkpoint: a DeepSpeed-like shard plus distlip's rank file."""
    path = store.begin(step)
    (path / MODEL).write_bytes(os.urandom(4096))
    (path / "distlip_rank0.pt").write_bytes(f"step {step}".encode())
    store.commit(step, {"lr": 0.1, "step": step})
    return path


def test_commit_writes_manifest_and_keeps_last_k(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        save(store, step)
    assert [p.name for p in store.tag_dirs()] == ["step_000003", "step_000004"]
    assert (tmp_path / "latest").read_text() == "step_000004"
    manifest = json.loads((tmp_path / "step_000004" / MANIFEST).read_text())
    assert (manifest["tag"], manifest["step"], manifest["world_size"]) == ("step_000004", 4, 1)
    assert manifest["meta"] == {"lr": 0.1, "step": 4}
    entries = {entry["path"]: entry for entry in manifest["files"]}
    assert sorted(entries) == ["distlip_rank0.pt", MODEL]
    data = (tmp_path / "step_000004" / MODEL).read_bytes()
    assert entries[MODEL]["bytes"] == len(data)
    assert entries[MODEL]["sha256"] == hashlib.sha256(data).hexdigest()
    ckpt = store.resolve("auto")
    assert (ckpt.tag, ckpt.step, ckpt.meta["lr"]) == ("step_000004", 4, 0.1)


def test_truncated_file_falls_back_to_previous_with_warning(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    save(store, 1)
    newest = save(store, 2)
    with open(newest / MODEL, "r+b") as handle:
        handle.truncate(100)
    with pytest.warns(CheckpointWarning, match=rf"step_000002 skipped: truncated file {MODEL} \(100 of 4096 bytes\)"):
        assert store.resolve("auto").tag == "step_000001"


def test_flipped_byte_is_a_checksum_mismatch_unless_only_sizes_are_checked(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    save(store, 1)
    shard = save(store, 2) / MODEL
    data = bytearray(shard.read_bytes())
    data[7] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=f"step_000002 skipped: checksum mismatch in {MODEL}"):
        assert store.find_good() == "step_000001"
    assert CheckpointStore(tmp_path, verify="size").find_good() == "step_000002"


def test_missing_manifest_is_torn_and_latest_never_points_to_it(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    save(store, 1)
    torn = store.begin(2)  # a save that died before commit()
    (torn / MODEL).write_bytes(b"partial")
    assert (tmp_path / "latest").read_text() == "step_000001"
    with pytest.warns(CheckpointWarning, match="step_000002 skipped: missing manifest: write was interrupted"):
        assert store.resolve("auto").tag == "step_000001"
    # Training past step 2 again replaces the torn directory, and commits clear torn leftovers.
    save(store, 2)
    assert json.loads((tmp_path / "step_000002" / MANIFEST).read_text())["step"] == 2
    store.begin(3)
    save(store, 4)
    assert [p.name for p in store.tag_dirs()] == ["step_000001", "step_000002", "step_000004"]


def test_explicit_checkpoints_are_verified_and_bad_ones_raise(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    save(store, 1)
    (save(store, 2) / MODEL).write_bytes(b"garbage")
    for named in ("step_000002", str(tmp_path / "step_000002")):  # a tag or a path
        with pytest.raises(CheckpointError, match=rf"step_000002 is unusable: truncated file {MODEL}"):
            store.resolve(named)
    with pytest.raises(CheckpointError, match=r"step_000009 not found.*available: step_000001, step_000002"):
        store.resolve("step_000009")
    other = CheckpointStore(tmp_path / "new-run")
    assert other.resolve(str(tmp_path / "step_000001")).step == 1


def test_never_overwrites_or_splices_committed_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        save(store, step)
    with pytest.raises(CheckpointError, match="step_000003 already holds a good checkpoint"):
        store.begin(3)
    with pytest.raises(CheckpointError, match="step_000002, step_000003 that resuming from"):
        store.resolve("step_000001")
    for fresh in (None, "", "none"):
        with pytest.raises(CheckpointError, match="a fresh start would overwrite"):
            store.resolve(fresh)
    assert store.resolve("step_000003").step == 3
    assert CheckpointStore(tmp_path / "empty").resolve("auto") is None
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        store.commit(4, {"bad": object()})


def _two_rank_worker(rank: int, root: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        store = CheckpointStore.for_process_group(root, keep_last=2)
        assert (store.rank, store.world_size) == (rank, 2)
        assert store.resolve("auto") is None
        for step in (10, 20, 30):
            path = store.begin(step)
            (path / f"distlip_rank{rank}.pt").write_bytes(bytes([rank]) * (100 + step))
            store.commit(step, {"step": step})
        ckpt = store.resolve("auto")
        assert (ckpt.tag, ckpt.world_size) == ("step_000030", 2)
        assert sorted(f["path"] for f in ckpt.manifest["files"]) == ["distlip_rank0.pt", "distlip_rank1.pt"]
        # Rank 0 decides; the refusal must reach rank 1 too instead of leaving it to write.
        try:
            store.begin(30)
            raise AssertionError("begin() over a good checkpoint did not raise")
        except CheckpointError:
            pass
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_commit_with_gloo(tmp_path):
    root = tmp_path / "run"
    # fork: the children reuse this process's imports (spawn would re-import torch, ~4 s each).
    mp.start_processes(_two_rank_worker, args=(str(root), str(tmp_path / "init")), nprocs=2, start_method="fork")
    assert [p.name for p in CheckpointStore(root).tag_dirs()] == [tag_for(20), tag_for(30)]
    assert (root / "latest").read_text() == "step_000030"

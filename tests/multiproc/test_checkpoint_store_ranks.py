"""CheckpointStore on two ranks (gloo): rank 0 decides, every rank's files are in the manifest,
a refusal reaches both ranks, and one rank's failed write is discarded on both."""

import errno

import torch.distributed as dist
import torch.multiprocessing as mp

from distlip.checkpoint.files import tag_for
from distlip.checkpoint.store import CheckpointStore
from distlip.errors import CheckpointError


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
        # Rank 1 alone runs out of space: both ranks raise (none waits for ever), the torn
        # directory goes, step 30 stays the latest.
        path = store.begin(40)
        failure = OSError(errno.ENOSPC, "No space left on device") if rank == 1 else None
        try:
            store.commit(40, failure=failure)
            raise AssertionError("commit() after a failed write did not raise")
        except CheckpointError as err:
            assert str(err).startswith(f"no space for checkpoint step_000040 in {root}: it needs about "), err
            assert str(err).endswith("(step_000030 is still the latest checkpoint, intact)"), err
        assert not path.exists()
        assert store.resolve("auto").tag == "step_000030"
    finally:
        dist.destroy_process_group()


def test_two_rank_commit_with_gloo(tmp_path):
    root = tmp_path / "run"
    # fork: the children reuse this process's imports (spawn would re-import torch, ~4 s each).
    mp.start_processes(_two_rank_worker, args=(str(root), str(tmp_path / "init")), nprocs=2, start_method="fork")
    assert [p.name for p in CheckpointStore(root).tag_dirs()] == [tag_for(20), tag_for(30)]
    assert (root / "latest").read_text() == "step_000030"

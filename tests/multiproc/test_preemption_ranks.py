"""PreemptionHandler on two ranks (gloo): when only one rank is signalled, both stop at the same step."""

import json
import os
import signal
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from distlip.preemption import PreemptionHandler


def _agreement_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with PreemptionHandler() as handler:
            stopped_at = None
            for step in range(10):
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGUSR2)
                if handler.should_stop():
                    stopped_at = step
                    break
        result = {"stopped_at": stopped_at, "received": handler.received}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_when_only_one_is_signalled(tmp_path):
    # fork: the children reuse this process's imports (spawn would re-import torch, ~4 s each).
    mp.start_processes(_agreement_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [
        {"stopped_at": 3, "received": None},
        {"stopped_at": 3, "received": int(signal.SIGUSR2)},
    ]

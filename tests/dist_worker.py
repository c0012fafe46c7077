"""Run under torchrun by tests/test_distributed.py: trains the tiny model at every ZeRO stage
with each constraint family and records, per rank, what the test compares."""

import hashlib
import sys

import torch

from distlip.lipschitz.certificate import exact_norms
from distlip.config import load_config
from distlip.distributed.env import exit_process
from distlip.trainer import Trainer

STAGES = (0, 1, 2, 3)
METHODS = ("soft_cap", "hard_cap", "spectral_normalize")
STEPS = 4


def overrides(stage: int, method: str) -> list[str]:
    """Shared with the single-process reference in the test."""
    return ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_heads=2",
            "model.context=16", "train.batch_size=8", "train.eval_every=0", f"train.steps={STEPS}",
            "optim.embed=adam", "optim.lr=0.2", "constraint.sigma_max=1.2", f"constraint.method={method}",
            f"dist.zero_stage={stage}", "train.threads=1"]


def run(stage: int, method: str, out: str) -> dict:
    trainer = Trainer(load_config("configs/smoke.yaml", overrides(stage, method)), out)
    record = {"losses": [], "max_norm": [], "digest": []}
    for _ in range(STEPS):
        loss, _ = trainer.train_step()
        record["losses"].append(loss)
        forward = {n: p.data for n, p in trainer.params.items() if n != "embed.weight"}
        record["max_norm"].append(max(exact_norms(forward).values()))
        flat = torch.cat([t.reshape(-1) for t in forward.values()] + [trainer.engine.embedding().reshape(-1)])
        record["digest"].append(hashlib.sha256(flat.numpy().tobytes()).hexdigest())  # bit-level identity
    record["weights"] = {**{n: p.data.clone() for n, p in trainer.params.items() if n != "embed.weight"},
                         "embed.weight": trainer.engine.embedding().clone()}
    record["owned"] = list(trainer.engine.owned)
    record["ns_calls"] = trainer.engine.optim.orthogonalized
    record["projections"] = trainer.engine.constrainer.calls
    record["all_matrices"] = list(trainer.matrices)
    return record


if __name__ == "__main__":
    out_file, run_dir = sys.argv[1], sys.argv[2]
    results = {(s, m): run(s, m, f"{run_dir}/{s}_{m}") for s in STAGES for m in METHODS}
    rank = torch.distributed.get_rank()
    torch.save(results, f"{out_file}.rank{rank}")
    exit_process(0)

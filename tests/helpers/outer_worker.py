"""Run under torchrun by tests/multiproc/test_outer_loop_dist.py: the local-step outer loop on the tiny model,
2 ranks. Each rank saves, per case, its losses, its own weights and their exact norms after every step,
the certificate the trainer computes (the largest norm over ranks), the byte fields, and an
uninterrupted run against one resumed from a checkpoint written mid-round."""

import sys

import torch

from distlip.config import load_config
from distlip.distributed.env import exit_process
from distlip.lipschitz.certificate import exact_norms
from distlip.trainer import Trainer

STEPS, H = 12, 3  # rounds end after steps 2, 5, 8 and 11
SAVE_AT = 7  # a checkpoint after 7 steps: position 1 of the round that ends after step 8
TINY = ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_layers=2", "model.n_heads=2",
        "model.context=16", "train.batch_size=8", "train.eval_every=0", f"train.steps={STEPS}", "optim.lr=0.2",
        "optim.embed=colnorm", "constraint.method=soft_cap", "constraint.sigma_max=1.2", "train.threads=1",
        f"compression.sync_every={H}", "compression.warmup_steps=0"]
CASES = {
    "dense": [],
    "topk+ef14": ["compression.compressor=topk", "compression.ratio=0.1", "compression.estimator=ef14"],
    "topk+ef21": ["compression.compressor=topk", "compression.ratio=0.1", "compression.estimator=ef21"],
}


def tiny(extra: list[str], out: str) -> Trainer:
    return Trainer(load_config("configs/smoke.yaml", TINY + extra), out)


def run(extra: list[str], out: str) -> dict:
    trainer = tiny(extra, out)
    record = {"losses": [], "weights": [], "norms": [], "certificate": [], "bytes": [], "distlip_params": 0}
    record["distlip_params"] = sum(trainer.params[n].numel() for n in trainer.engine.plan.owner)
    for _ in range(STEPS):
        record["losses"].append(trainer.train_step()[0])
        mine = {n: p.data.clone() for n, p in trainer.params.items()}
        record["weights"].append(mine)
        record["norms"].append(exact_norms({n: mine[n] for n in trainer.matrices}))
        record["certificate"].append(trainer.certificate(exact=True).max_cap_ratio)
        record["bytes"].append(trainer.engine.log_fields())
    record["final_certified"] = not trainer.certificate(exact=True).violations(trainer.caps)
    record["masters"] = trainer.engine.master_weights()
    return record


def resume_case(extra: list[str], out: str) -> dict:
    """STEPS steps straight, saving after SAVE_AT; a fresh trainer resumed from that checkpoint
    then runs the rest. Returns both runs' losses after SAVE_AT and final weights."""
    straight = tiny(extra, f"{out}/a")
    losses = []
    for _ in range(STEPS):
        losses.append(straight.train_step()[0])
        if straight.step == SAVE_AT:
            straight.save()
    resumed = tiny([*extra, f"train.resume={out}/a/step_{SAVE_AT:06d}"], f"{out}/b")
    assert resumed.step == SAVE_AT
    again = [resumed.train_step()[0] for _ in range(STEPS - SAVE_AT)]
    return {"straight": losses[SAVE_AT:], "resumed": again,
            "straight_weights": {n: p.data.clone() for n, p in straight.params.items()},
            "resumed_weights": {n: p.data.clone() for n, p in resumed.params.items()}}


if __name__ == "__main__":
    out_file, run_dir = sys.argv[1], sys.argv[2]
    results = {"runs": {name: run(extra, f"{run_dir}/{name}") for name, extra in CASES.items()},
               "resume": {name: resume_case(extra, f"{run_dir}/resume-{name}") for name, extra in CASES.items()}}
    torch.save(results, f"{out_file}.rank{torch.distributed.get_rank()}")
    exit_process(0)

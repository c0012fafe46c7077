"""Run under torchrun by tests/multiproc/test_compress_train.py: every tiny-model compressed-training
check in one 2-process launch. Each rank saves, per case, what the tests compare."""

import sys

import torch

from distlip.config import load_config
from distlip.distributed.env import exit_process
from distlip.lipschitz.certificate import exact_norms
from distlip.trainer import Trainer

# ---- tiny model: equivalence, certificate, state ------------------------------------------
TINY_STEPS = 6
TINY = ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_layers=2", "model.n_heads=2",
        "model.context=16", "train.batch_size=8", "train.eval_every=0", f"train.steps={TINY_STEPS}",
        "optim.lr=0.2", "optim.embed=colnorm", "constraint.method=soft_cap", "constraint.sigma_max=1.2",
        "train.threads=1", "compression.warmup_steps=1"]
# The embedding held (and reduced densely) by DeepSpeed; stage 3 also partitions it.
ZERO1 = ["optim.embed=adam", "dist.zero_stage=1"]
ZERO3 = ["optim.embed=adam", "dist.zero_stage=3"]


def family(compressor: str, estimator: str, ratio: float = 1.0) -> list[str]:
    return [f"compression.compressor={compressor}", f"compression.estimator={estimator}", f"compression.ratio={ratio}"]


# Ratio 1.0 (downlink ratio 1.0) of every estimator family: must equal the dense path bit for bit.
RATIO_ONE = {
    "dense": family("identity", "dense"),
    "topk+ef21": family("topk", "ef21"),
    "topk+ef14": family("topk", "ef14"),
    "randk+diana": family("randk", "diana"),
    "randk+marina": family("randk", "marina"),
    "randk_unscaled+ef21": family("randk_unscaled", "ef21"),
    "randk+plain": family("randk", "plain"),
    "topk+ef21+downlink": family("topk", "ef21") + ["compression.downlink=topk", "compression.downlink_ratio=1.0"],
    "zero1/topk+ef21": ZERO1 + family("topk", "ef21"),
    "zero3/randk+diana": ZERO3 + family("randk", "diana"),
    "lowrank": ["compression.compressor=lowrank", "compression.ratio=1.0"],  # full rank: every tensor whole
}
REFERENCES = {"off": [], "zero1/off": ZERO1, "zero3/off": ZERO3}
# Compressed both ways: the masters must stay under their caps at every step.
CERTIFIED = {
    "topk5%+ef21+downlink5%": family("topk", "ef21", 0.05) + ["compression.downlink=topk",
                                                              "compression.downlink_ratio=0.05"],
    "randk5%+diana+downlink-randk5%": family("randk", "diana", 0.05) + ["compression.downlink=randk_unscaled",
                                                                        "compression.downlink_ratio=0.05"],
}


# Low rank: every rank steps every matrix from the same aggregate; nothing is sent back.
LOWRANK = {"lowrank r2": ["compression.compressor=lowrank", "compression.rank=2"]}


# Resumed mid-run: low rank, the certified pairs, MARINA on one batch (its previous weights are state), and EF21
# with two momenta (each v follows the η of its share).
RESUMED = {**CERTIFIED, **LOWRANK, "randk5%+marina": family("randk", "marina", 0.05),
           "topk5%+ef21-two-momenta": family("topk", "ef21", 0.05) + ["compression.ef21_eta=0.1",
                                                                        "compression.ef21_eta_sent=0.01"]}
# MARINA's second pass holds DeepSpeed's embedding fixed: after the first compressed step (1) the
# embedding must be what DIANA's run gives, since both took the same dense step 0.
ZERO1_MARINA = {name: ZERO1 + family("randk", name, 0.05) for name in ("marina", "diana")}


def tiny(extra: list[str], out: str) -> Trainer:
    return Trainer(load_config("configs/smoke.yaml", TINY + extra), out)


def forward_weights(trainer: Trainer) -> dict:
    return {n: p.data.clone() for n, p in trainer.params.items()}


def run_tiny(extra: list[str], out: str) -> dict:
    """Losses and, after every step, the forward weights (w) and exact norms of the masters (x)."""
    trainer = tiny(extra, out)
    record = {"losses": [], "weights": [], "master_norms": [], "master_minus_forward": [], "bytes": []}
    for _ in range(TINY_STEPS):
        record["losses"].append(trainer.train_step()[0])
        record["weights"].append(forward_weights(trainer))
        masters = trainer.engine.master_weights()
        record["master_norms"].append(exact_norms({n: masters[n] for n in trainer.matrices}))
        record["master_minus_forward"].append(max((masters[n] - p.data).abs().max().item()
                                                  for n, p in trainer.params.items()))
        record["bytes"].append(trainer.engine.log_fields())
    record["certificate"] = trainer.certificate(exact=True).max_cap_ratio
    return record


def snapshot(trainer: Trainer) -> dict:
    """Everything a resume needs, taken at a step boundary (deep copies)."""
    e = trainer.engine
    clone = lambda tree: {k: clone(v) if isinstance(v, dict) else v.clone() for k, v in tree.items()}  # noqa: E731
    return {"weights": forward_weights(trainer), "momentum": clone(e.optim.state_dict()["momentum"]),
            "constraint": clone(e.constrainer.state_dict()), "data": trainer.data.train.state_dict(),
            "compression": clone(e.compression_state_dict()), "step": trainer.step}


def restore(trainer: Trainer, snap: dict) -> None:
    e = trainer.engine
    for n, w in snap["weights"].items():
        trainer.params[n].data.copy_(w)
    e.optim.load_state_dict({"momentum": snap["momentum"]})
    e.constrainer.load_state_dict(snap["constraint"])
    trainer.data.train.load_state_dict(snap["data"])
    e.load_compression_state_dict(snap["compression"])
    trainer.step = snap["step"]


def resume_case(extra: list[str], out: str) -> dict:
    """Train 6 steps straight, and 3 steps + restore into a fresh trainer + 3 steps."""
    straight = tiny(extra, f"{out}/a")
    for _ in range(3):
        straight.train_step()
    snap = snapshot(straight)
    for _ in range(3):
        straight.train_step()
    resumed = tiny(extra, f"{out}/b")
    restore(resumed, snap)
    for _ in range(3):
        resumed.train_step()
    return {"straight": straight.engine.master_weights(), "resumed": resumed.engine.master_weights(),
            "state_names": sorted(snap["compression"])}


if __name__ == "__main__":
    out_file, run_dir = sys.argv[1], sys.argv[2]
    results = {
        "ratio_one": {name: run_tiny(extra, f"{run_dir}/{name}")
                      for name, extra in {**REFERENCES, **RATIO_ONE}.items()},
        "certified": {name: run_tiny(extra, f"{run_dir}/{name}") for name, extra in CERTIFIED.items()},
        "lowrank": {name: run_tiny(extra, f"{run_dir}/{name}") for name, extra in LOWRANK.items()},
        "resume": {name: resume_case(extra, f"{run_dir}/resume-{name}") for name, extra in RESUMED.items()},
        "zero1_marina": {name: run_tiny(extra, f"{run_dir}/zero1-{name}") for name, extra in ZERO1_MARINA.items()},
    }
    torch.save(results, f"{out_file}.rank{torch.distributed.get_rank()}")
    exit_process(0)

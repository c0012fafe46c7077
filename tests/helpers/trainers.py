"""A tiny in-process trainer on the smoke preset, for tests that step it by hand."""

import torch

from distlip.config import load_config
from distlip.trainer import Trainer

SMOKE = "configs/smoke.yaml"
FAST = ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_heads=2",
        "model.context=16", "train.batch_size=4", "train.eval_every=0"]


def make_trainer(tmp_path, *overrides) -> Trainer:
    """The smoke model at d 16, one thread, writing under `tmp_path`."""
    torch.set_num_threads(1)
    return Trainer(load_config(SMOKE, [*FAST, *overrides]), tmp_path)

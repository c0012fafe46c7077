"""Distributed settings are checked before any process-group work, with one-line errors."""

import json

import pytest
import torch

from distlip.config import load_config
from distlip.distributed.deepspeed import apply_launcher_zero_stage, deepspeed_config
from distlip.distributed.env import DistEnv, select_device
from distlip.errors import ConfigError
from distlip.preflight import check_distributed

SMOKE = "configs/smoke.yaml"


def cfg(*overrides):
    return load_config(SMOKE, list(overrides))


def test_world_size_must_divide_the_global_batch():
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        check_distributed(cfg("train.batch_size=8"), DistEnv(0, 3, 0))
    check_distributed(cfg("train.batch_size=12"), DistEnv(0, 3, 0))


def test_zero_stage_needs_a_deepspeed_parameter():
    with pytest.raises(ConfigError, match="optim.embed=adam"):
        check_distributed(cfg("dist.zero_stage=2", "optim.embed=colnorm"), DistEnv(0, 2, 0))
    check_distributed(cfg("dist.zero_stage=2", "optim.embed=adam"), DistEnv(0, 2, 0))


def test_adamw_baseline_is_single_process():
    with pytest.raises(ConfigError, match="one process"):
        check_distributed(cfg("optim.name=adamw"), DistEnv(0, 2, 0))


def test_bf16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="bfloat16"):
        select_device(cfg("train.dtype=bfloat16", "train.device=cpu"))


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    """One GPU visible, two processes on the node: the second rank is refused in one line
    (NCCL would fail on a duplicate device, or CUDA on a missing ordinal)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device(cfg("train.device=cuda"), local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="local rank 1 has no GPU of its own .1 visible.*one GPU per process"):
        select_device(cfg("train.device=cuda"), local_rank=1)


def test_generated_deepspeed_config_matches_the_typed_config():
    ds = deepspeed_config(cfg("train.batch_size=16", "train.grad_accum=2", "dist.zero_stage=3", "optim.embed=adam"), 2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.0 and ds["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("user, fragment", [
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"zero_optimization": {"stage": 1}}, "contradicts dist.zero_stage"),
    ({"train_batch_size": 99}, "train_batch_size=99"),
    ({"bf16": {"enabled": True}}, "train.dtype=bfloat16"),
    ({"optimizer": {"type": "Lamb"}}, "not supported"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.3}}}, "optimizer.params.lr=0.3 contradicts"),
    ({"optimizer": {"params": {"betas": [0.9, 0.99]}}}, "set it through optim.betas"),
])
def test_contradicting_user_deepspeed_json_is_refused(tmp_path, user, fragment):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError, match=fragment):
        check_distributed(cfg("dist.zero_stage=2", "optim.embed=adam", f"dist.deepspeed_config={path}"),
                          DistEnv(0, 2, 0))


def test_user_deepspeed_json_is_checked_on_one_process_too(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        check_distributed(cfg(f"dist.deepspeed_config={tmp_path / 'missing.json'}"), DistEnv(0, 1, 0))


def test_user_deepspeed_json_adds_settings(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "train_batch_size": "auto"}))
    ds = deepspeed_config(cfg("dist.zero_stage=2", "optim.embed=adam", f"dist.deepspeed_config={path}"), 2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["train_batch_size"] == 8


def test_accelerate_zero_stage(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert apply_launcher_zero_stage(cfg(), []).dist.zero_stage == 3
    with pytest.raises(ConfigError, match="accelerate config says ZeRO stage 3"):
        apply_launcher_zero_stage(cfg("dist.zero_stage=1"), ["dist.zero_stage=1"])

"""distlip's contact surface with DeepSpeed: the JSON it is given, and the embedding's Adam state.

DeepSpeed runs only the embedding's Adam (when `optim.embed=adam` on several ranks). Its JSON is
generated from the typed config (`deepspeed_config`); a user JSON may add settings but not
contradict them.

The DeepSpeed-held embedding's Adam state as full fp32 tensors, at any ZeRO stage:

DeepSpeed's base optimizer is a torch Adam: over the parameter itself at ZeRO-0, over this
rank's flat fp32 partition at ZeRO-1/2/3. `gather_adam` assembles the full (vocab, d)
moments, which any world size (or a single-process torch Adam) can load; `scatter_adam`
writes them back into this rank's partition. Both use the same layout as torch Adam's own
per-parameter state, {"step": 0-dim fp32, "exp_avg": (vocab, d), "exp_avg_sq": (vocab, d)},
so a single-process checkpoint and a DeepSpeed one are interchangeable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from distlip.config.schema import Config
from distlip.errors import ConfigError

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def apply_launcher_zero_stage(cfg: Config, overrides: list[str]) -> Config:
    """`accelerate launch` with a DeepSpeed config exports its ZeRO stage; it sets dist.zero_stage
    unless the command line set it too, in which case the two must agree."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None:
        return cfg
    explicit = any(o.split("=", 1)[0].strip() == "dist.zero_stage" for o in overrides)
    if explicit and int(stage) != cfg.dist.zero_stage:
        raise ConfigError(f"the accelerate config says ZeRO stage {stage} but dist.zero_stage={cfg.dist.zero_stage}; "
                          "drop one of them")
    cfg.dist.zero_stage = int(stage)
    return cfg


def uses_deepspeed(cfg: Config, env) -> bool:
    """Whether DeepSpeed holds the embedding (its Adam) in this job; `env`: a `DistEnv`."""
    return env.world_size > 1 and cfg.optim.name == "muon" and cfg.optim.embed == "adam"


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed JSON for the embedding's Adam, generated from the typed config; a user JSON
    (dist.deepspeed_config) may add settings but not contradict these."""
    t, o = cfg.train, cfg.optim
    ours = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // (world_size * t.grad_accum),
        "gradient_accumulation_steps": t.grad_accum,
        "optimizer": {"type": "Adam", "params": {
            "lr": o.lr * o.lr_mult.get("embed", 1.0), "betas": list(o.betas), "eps": o.eps, "weight_decay": 0.0,
            "torch_adam": True, "adam_w_mode": False}},
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "gradient_clipping": 0.0,  # Muon's update norm is fixed; clipping would break the soft-cap coupling
        "bf16": {"enabled": False},  # bf16 is autocast with fp32 master weights (train.dtype)
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    path = cfg.dist.deepspeed_config
    if not path:
        return ours
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dist.deepspeed_config '{p}' not found")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"dist.deepspeed_config '{p}' is not valid JSON: {exc}") from None
    _check_user_deepspeed(user, ours, p)
    merged = dict(user)
    for key, value in ours.items():
        merged[key] = {**user.get(key, {}), **value} if isinstance(value, dict) and isinstance(user.get(key), dict) else value
    return merged


def _check_user_deepspeed(user: dict, ours: dict, path: Path) -> None:
    def refuse(what: str, fix: str) -> None:
        raise ConfigError(f"{path}: {what}; {fix}")

    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in user and user[key] != "auto" and user[key] != ours[key]:
            refuse(f"{key}={user[key]} contradicts the config ({ours[key]})", "remove it or set it to \"auto\"")
    stage = user.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != ours["zero_optimization"]["stage"]:
        refuse(f"zero_optimization.stage={stage} contradicts dist.zero_stage={ours['zero_optimization']['stage']}",
               "set the stage in one place")
    if float(user.get("gradient_clipping", 0) or 0) > 0:
        refuse("gradient_clipping is on", "Muon's update norm is fixed and the soft cap relies on it: set it to 0")
    for half in ("fp16", "bf16"):
        if user.get(half, {}).get("enabled"):
            refuse(f"{half}.enabled is true", "use train.dtype=bfloat16 (autocast, fp32 master weights)")
    opt = user.get("optimizer", {}).get("type")
    if opt is not None and opt.lower() not in ("adam", "adamw"):
        refuse(f"optimizer.type={opt} is not supported", "distlip runs Muon itself and gives DeepSpeed Adam only")
    fields = {"lr": "optim.lr × optim.lr_mult.embed", "betas": "optim.betas", "eps": "optim.eps",
              "weight_decay": "constraint.weight_decay (the embedding's Adam takes none)"}
    given, generated = user.get("optimizer", {}).get("params", {}), ours["optimizer"]["params"]
    for key, where in fields.items():
        if key in given and given[key] != "auto" and given[key] != generated[key]:
            refuse(f"optimizer.params.{key}={given[key]} contradicts the config ({generated[key]})",
                   f"set it through {where}, or remove it")


def _base_optimizer(ds) -> torch.optim.Optimizer:
    return ds.optimizer if ds.zero_optimization_stage() == 0 else ds.optimizer.optimizer


def _partitions(ds) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions at ZeRO ≥ 1: the tensors the base Adam's state is keyed by
    (ZeRO-3 puts each into the Adam's param group only for the duration of its step)."""
    zero = ds.optimizer
    return list(zero.fp32_partitioned_groups_flat if ds.zero_optimization_stage() == 3
                else zero.single_partition_of_fp32_groups)


def gather_adam(ds, param: torch.nn.Parameter) -> dict | None:
    """Collective at ZeRO ≥ 1 (call on every rank). The full Adam state of `param` on CPU, or
    None before DeepSpeed's first step (torch Adam creates its state lazily; every rank alike)."""
    base = _base_optimizer(ds)
    if ds.zero_optimization_stage() == 0:
        state = base.state.get(param)
        return {k: v.detach().cpu().clone() for k, v in state.items()} if state else None
    first = base.state.get(_partitions(ds)[0])
    if not first:
        return None
    from deepspeed.utils import safe_get_full_optimizer_state
    out = {"step": torch.as_tensor(first["step"], dtype=torch.float32).detach().cpu().clone()}
    for key in ADAM_MOMENTS:
        out[key] = safe_get_full_optimizer_state(param, key).detach().float().cpu()
    return out


@torch.no_grad()
def scatter_adam(ds, param: torch.nn.Parameter, state: dict) -> None:
    """Load a full Adam state (as from `gather_adam` or torch Adam) into DeepSpeed; no communication."""
    base = _base_optimizer(ds)
    step = torch.as_tensor(state["step"], dtype=torch.float32).clone()
    if ds.zero_optimization_stage() == 0:
        base.state[param] = {"step": step,
                             **{k: state[k].to(param.device, torch.float32).clone() for k in ADAM_MOMENTS}}
        return
    # Create the state torch Adam would create at its first step, then fill this rank's slice.
    partitions = _partitions(ds)
    for flat in partitions:
        base.state[flat] = {"step": step.clone(), **{k: torch.zeros_like(flat) for k in ADAM_MOMENTS}}
    if ds.zero_optimization_stage() in (1, 2):
        # ZeRO-1/2 reach the state through per-parameter views made once, after the first step;
        # point them at the new tensors (what DeepSpeed's own universal-checkpoint load does).
        ds.optimizer._hp_optimizer_states_linked = False
        ds.optimizer._lazy_init_hp_params_optimizer_state()
    from deepspeed.utils import safe_set_full_optimizer_state
    device = partitions[0].device
    for key in ADAM_MOMENTS:
        safe_set_full_optimizer_state(param, state[key].to(device, torch.float32), key)

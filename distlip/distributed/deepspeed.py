"""The DeepSpeed-held embedding's Adam state as full fp32 tensors, at any ZeRO stage.

DeepSpeed's base optimizer is a torch Adam: over the parameter itself at ZeRO-0, over this
rank's flat fp32 partition at ZeRO-1/2/3. `gather_adam` assembles the full (vocab, d)
moments, which any world size (or a single-process torch Adam) can load; `scatter_adam`
writes them back into this rank's partition. Both use the same layout as torch Adam's own
per-parameter state, {"step": 0-dim fp32, "exp_avg": (vocab, d), "exp_avg_sq": (vocab, d)},
so a single-process checkpoint and a DeepSpeed one are interchangeable.
"""

from __future__ import annotations

import torch

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


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

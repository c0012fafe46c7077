"""Caps from a target bound: the certificate at caps, the soft cap's smallest caps, the allocation.

The certificate is increasing in every norm it reads, so the certificate evaluated with every
norm at its cap (`bound_at_caps`) bounds the certificate of any weights that obey the caps:
caps chosen with `bound_at_caps(caps) ≤ B` make the run's certificate ≤ B after every step.

Allocation rule (`allocate`): the matrix groups keep the ratios of their configured caps
(`constraint.caps`, missing groups at `sigma_max`: by default all equal) and are scaled by one
factor t; the embedding keeps its cap. Under the soft cap with Muon each group's cap is kept at
or above its floor μ/0.3 (μ = lr·mult·1.14502·margin, the step the coupling must absorb), so
caps(t) = max(floor, t·ratio) per group. caps(t) is increasing in t, so bisection on t finds the
largest caps whose bound is ≤ B, and the smallest bound any caps can reach is the bound with
every group at its floor: a target below it is refused with that number.
"""

from __future__ import annotations

import dataclasses

from distlip.config.choices import GROUPS
from distlip.errors import ConfigError
from distlip.lipschitz.caps import CAPPED_METHODS, group_caps
from distlip.lipschitz.certificate import certify
from distlip.model import block_key

# Learning-rate group (optim.lr_mult) of each cap group's matrices.
_LR_GROUP = {"qk": "qkv", "v": "qkv", "o": "out", "mlp_in": "mlp", "mlp_out": "mlp", "head": "head"}


def bound_at_caps(caps: dict[str, float], model, per_head: bool = True) -> float:
    """The certificate (token ids → logits) with every norm at its group's cap. `model` is a
    `ModelConfig`; without per-head caps each W_q/W_k/W_v head block is bounded by √H·cap."""
    norms = {"head.weight": caps["head"]}
    H = model.n_heads
    for i in range(model.n_layers):
        for key, group in (("attn.q", "qk"), ("attn.k", "qk"), ("attn.v", "v"), ("attn.o", "o"),
                           ("mlp.fc_in", "mlp_in"), ("mlp.fc_out", "mlp_out")):
            name = f"blocks.{i}.{key}.weight"
            norms[name] = caps[group]
            if per_head and key in ("attn.q", "attn.k", "attn.v"):
                norms.update({block_key(name, h): caps[group] for h in range(H)})
    return certify(norms, caps["embed"], model).bound


def soft_cap_floors(cfg) -> dict[str, float]:
    """Smallest cap per matrix group under the soft cap with Muon: μ/0.3 with μ = lr·mult·NS gain·margin
    (below it the composite overshoots the cap). Empty for other methods or optimisers."""
    from distlip.lipschitz.constraints import SOFT_CAP_MAX_MU
    from distlip.lipschitz.newton_schulz import NS_MAX_GAIN

    c, o = cfg.constraint, cfg.optim
    if c.method != "soft_cap" or o.name != "muon":
        return {}
    return {g: o.lr * o.lr_mult.get(lr_group, 1.0) * NS_MAX_GAIN * c.margin / SOFT_CAP_MAX_MU
            for g, lr_group in _LR_GROUP.items()}


def allocate(cfg) -> dict[str, float]:
    """Caps of every group for `constraint.target_bound` = B > 0 (rule in the module docstring),
    or ConfigError (one line) when no caps reach B or the method gives no guarantee."""
    c = cfg.constraint
    B = c.target_bound
    if c.method not in CAPPED_METHODS:
        raise ConfigError(f"constraint.target_bound needs a method that caps every matrix "
                          f"({', '.join(CAPPED_METHODS)}); {c.method!r} gives no guarantee")
    if not c.embed_cap:
        raise ConfigError("constraint.target_bound needs constraint.embed_cap=true: the bound counts the "
                          "embedding's token RMS at its cap")
    ratios, floors = group_caps(c), soft_cap_floors(cfg)

    def caps_at(t: float) -> dict[str, float]:
        return {g: ratios[g] if g == "embed" else max(floors.get(g, 0.0), t * ratios[g]) for g in GROUPS}

    def bound(t: float) -> float:
        return bound_at_caps(caps_at(t), cfg.model, c.per_head)

    smallest = bound(0.0)
    if smallest > B:
        raise ConfigError(f"constraint.target_bound={B:g} cannot be met: the smallest caps the soft cap allows at "
                          f"optim.lr={cfg.optim.lr:g} (Muon step/0.3 per group) certify {smallest:.6g}; set "
                          f"target_bound ≥ {smallest:.6g}, lower optim.lr, or use constraint.method=hard_cap")
    lo, hi = 0.0, 1.0
    while bound(hi) <= B:
        lo, hi = hi, 2.0 * hi
        if hi > 1e12:
            return caps_at(lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if bound(mid) <= B else (lo, mid)
    return caps_at(lo)


def check_target(cfg) -> None:
    """Refuse a target bound that cannot be met (ConfigError, one line); nothing else."""
    allocate(cfg)


def apply_target(cfg):
    """`cfg` with `constraint.caps` replaced by the target bound's allocation (every group
    explicit), or `cfg` itself when there is no target. `cfg` is a whole Config."""
    if cfg.constraint.target_bound <= 0:
        return cfg
    return dataclasses.replace(cfg, constraint=dataclasses.replace(cfg.constraint, caps=allocate(cfg)))

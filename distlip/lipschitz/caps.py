"""The cap of every matrix: groups, per-group caps from the config, and what is capped.

Groups: `embed` (largest token-vector RMS of the embedding), `qk` (W_q and W_k), `v`, `o`,
`mlp_in`, `mlp_out`, `head`. Caps are RMS→RMS operator norms (‖W‖ = √(d_in/d_out)·σ₁). A group
missing from `constraint.caps` has `constraint.sigma_max` (the embedding: 1). With
`constraint.per_head` (the default) W_q, W_k and W_v are capped per attention head: each
(d_head, d) row block in its own RMS→RMS units, which is what the certificate reads.
"""

from __future__ import annotations

from distlip.config.choices import GROUPS
from distlip.model import block_key, head_blocks

# Methods whose map guarantees ‖W‖ ≤ cap after every step (the others give no bound).
CAPPED_METHODS = ("soft_cap", "hard_cap", "spectral_normalize", "stiefel", "exact_cap")
EMBED = "embed.weight"


def group_of(name: str) -> str:
    """Cap group of a parameter name."""
    if name == EMBED:
        return "embed"
    if name == "head.weight":
        return "head"
    for suffix, group in (("attn.q.weight", "qk"), ("attn.k.weight", "qk"), ("attn.v.weight", "v"),
                          ("attn.o.weight", "o"), ("mlp.fc_in.weight", "mlp_in"), ("mlp.fc_out.weight", "mlp_out")):
        if name.endswith(suffix):
            return group
    raise KeyError(f"parameter {name} belongs to no cap group")


def group_caps(constraint) -> dict[str, float]:
    """Cap of every group from a `ConstraintConfig`: `caps`, else `sigma_max` (embedding: 1)."""
    return {g: float(constraint.caps.get(g, 1.0 if g == "embed" else constraint.sigma_max)) for g in GROUPS}


def caps_text(constraint) -> str:
    """Every group's cap on one line, `embed 1  qk 0.1721  v 2.581 …` (start-up banner, certify)."""
    return "  ".join(f"{g} {c:.4g}" for g, c in group_caps(constraint).items())


def constraint_summary(constraint) -> str:
    """One line for the start-up banner: the method and where its caps come from."""
    c = constraint
    if c.method not in CAPPED_METHODS:
        return c.method
    if c.target_bound > 0:
        return f"{c.method}, caps chosen for a certified bound ≤ {c.target_bound:g}"
    if c.caps:
        return f"{c.method}, per-group caps {caps_text(c)}"
    return f"{c.method} σmax={c.sigma_max:g}"


def cap_of(name: str, constraint) -> float:
    """The cap of parameter `name` (its group's), RMS→RMS units; the embedding's is a token RMS."""
    return group_caps(constraint)[group_of(name)]


def matrix_caps(constraint, names: list[str]) -> dict[str, float]:
    """Cap of each named matrix (what the Constrainer applies, per block where split by head)."""
    caps = group_caps(constraint)
    return {n: caps[group_of(n)] for n in names}


def row_blocks(cfg, names: list[str]) -> dict[str, int]:
    """Head blocks each matrix is constrained as: model.n_heads for W_q/W_k/W_v under
    `constraint.per_head`, else 1. `cfg` is a whole Config."""
    H = cfg.model.n_heads if cfg.constraint.per_head else 1
    return {n: head_blocks(n, H) for n in names}


def unit_caps(cfg, names: list[str]) -> dict[str, float | None]:
    """Caps by certified unit, the keys of the certificate's norm table: head blocks
    (`block_key(name, h)`) of W_q/W_k/W_v under per_head, whole matrices otherwise; every cap
    None for methods that give no guarantee (decay, hammer, none). `cfg` is a whole Config."""
    capped = cfg.constraint.method in CAPPED_METHODS
    caps = matrix_caps(cfg.constraint, names)
    blocks = row_blocks(cfg, names)
    out: dict[str, float | None] = {}
    for n in names:
        keys = [block_key(n, h) for h in range(blocks[n])] if blocks[n] > 1 else [n]
        out.update({k: caps[n] if capped else None for k in keys})
    return out


def has_caps(caps: dict[str, float | None]) -> bool:
    """Whether a caps table (as `unit_caps`) caps anything, i.e. the run has a certificate."""
    return any(c is not None for c in caps.values())

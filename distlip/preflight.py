"""The refusals run before any data, process-group or DeepSpeed work that need more than the
config package: the soft cap's smallest caps and a target bound's certificate (`lipschitz`),
the compression block checked by building its objects (`compress`), and the launch (world
size, a user DeepSpeed JSON, devices). `config.checks.validate` has already run in
`load_config`; the trainer calls `preflight` first, so a mistake costs one line, not a job."""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

from distlip.compress import check as check_compression_objects
from distlip.compress import estimator_name
from distlip.compress.lowrank import factor_rank
from distlip.compress.quantisers import sum_levels
from distlip.config.checks import check_device
from distlip.config.schema import Config
from distlip.distributed.deepspeed import deepspeed_config
from distlip.errors import ConfigError
from distlip.lipschitz.budget import check_target, soft_cap_floors
from distlip.lipschitz.caps import group_caps
from distlip.lipschitz.constraints import SOFT_CAP_MAX_MU
from distlip.model import LipschitzTransformer


class Placement(Protocol):
    """Where this process runs in the job (a `distributed.env.DistEnv`)."""

    world_size: int
    local_rank: int


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def preflight(cfg: Config, env: Placement) -> None:
    """Every refusal not made by `load_config`: the config against the packages above it, then
    the launch environment."""
    check_config(cfg)
    check_distributed(cfg, env)
    check_device(cfg, env.local_rank)


def check_config(cfg: Config) -> None:
    """The config's rules that need the lipschitz and compress packages (no environment)."""
    if cfg.constraint.target_bound > 0:
        check_target(cfg)
    else:  # the target's allocation keeps every cap above its floor (or refuses the target)
        check_soft_cap_step(cfg)
    check_compression(cfg)


def round_down(x: float, digits: int = 3) -> float:
    """x > 0 rounded down to `digits` significant digits: a limit quoted in an error must pass."""
    unit = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.floor(x / unit) * unit


def check_soft_cap_step(cfg: Config) -> None:
    """With Muon, the soft cap's coupling needs the largest update norm μ = lr·mult·1.14502·margin
    to stay ≤ 0.3·cap for every group (beyond that the composite overshoots the cap)."""
    o = cfg.optim
    caps = group_caps(cfg.constraint)
    for group, floor in soft_cap_floors(cfg).items():
        _require(caps[group] >= floor,
                 f"soft cap: the {group} matrices' Muon step (lr·mult·1.145·margin = {floor * SOFT_CAP_MAX_MU:.3g}) "
                 f"exceeds {SOFT_CAP_MAX_MU}·cap = {SOFT_CAP_MAX_MU * caps[group]:.3g}, so the cap would overshoot; "
                 f"lower optim.lr to ≤ {round_down(o.lr * caps[group] / floor):.3g}, raise the cap "
                 f"(constraint.caps.{group} or constraint.sigma_max), or use constraint.method=hard_cap")


def check_compression(cfg: Config) -> None:
    """The compression block, by the compress package's own checks, and what it can be combined with."""
    c = cfg.compression
    try:
        check_compression_objects(c)
    except ConfigError as exc:
        raise ConfigError(f"compression: {exc}") from None
    _require(not c.enabled or cfg.optim.name == "muon",
             "compression applies to distlip's sharded Muon path (matrices and the colnorm embedding); "
             "use optim.name=muon, or leave compression.compressor=identity")
    _require(c.ef21_eta_sent is None or estimator_name(c) == "ef21",
             f"compression.ef21_eta_sent applies to the ef21 estimator, not {estimator_name(c)}; "
             "drop it or set compression.estimator=ef21")
    check_lowrank_shapes(cfg)
    _require(not (c.enabled and estimator_name(c) == "ef21" and c.ef21_eta < 1 and cfg.optim.nesterov),
             f"compression.ef21_eta={c.ef21_eta} makes EF21 carry the momentum (β = 1 − η) and Muon then steps "
             "without its own, which the Nesterov form cannot express; set optim.nesterov=false or "
             "compression.ef21_eta=1.0")
    check_outer_loop(cfg)


def check_outer_loop(cfg: Config) -> None:
    """The local-step outer loop (compression.sync_every = H > 1) and the options it cannot honour."""
    c, h = cfg.compression, cfg.compression.sync_every
    _require(isinstance(h, int) and not isinstance(h, bool) and h >= 1,
             f"compression.sync_every={h!r} must be an integer ≥ 1 (1: gradients exchanged every step; "
             "H > 1: H local steps per round, then one pseudo-gradient exchange)")
    _require(c.outer_lr > 0, f"compression.outer_lr={c.outer_lr} must be > 0 (DiLoCo's is 0.7)")
    _require(0 <= c.outer_momentum < 1, f"compression.outer_momentum={c.outer_momentum} must be in [0, 1) "
             "(DiLoCo's is 0.9)")
    if h == 1:
        return
    _require(cfg.optim.embed == "colnorm",
             f"compression.sync_every={h} takes local steps, but optim.embed=adam gives the embedding to DeepSpeed "
             f"(dist.zero_stage={cfg.dist.zero_stage}), which all-reduces its gradients every step; set "
             "optim.embed=colnorm and dist.zero_stage=0, or compression.sync_every=1")
    _require(c.downlink == "identity",
             f"compression.downlink={c.downlink} compresses the weights owners send back every step, and the outer "
             f"loop sends none (every rank takes the same outer step); drop compression.downlink, or set "
             "compression.sync_every=1")
    name = estimator_name(c)
    _require(name != "marina",
             "compression.estimator=marina takes a second backward pass at the previous weights, which a "
             "pseudo-gradient has no counterpart of; with compression.sync_every > 1 use ef14 or ef21 (topk), "
             "diana (randk) or dense (identity)")
    _require(not (name == "ef21" and c.ef21_eta < 1),
             f"compression.ef21_eta={c.ef21_eta} makes EF21 carry a momentum, which with compression.sync_every > 1 "
             "the outer Nesterov step carries (compression.outer_momentum); set compression.ef21_eta=1.0")


def check_lowrank_shapes(cfg: Config) -> None:
    """Under compressor lowrank, refuse a rank above some distlip-held matrix's smaller side, naming
    the first such matrix and its shape. The embedding and head need the vocabulary; until it is
    known (model.vocab_size 0) they are left to the trainer, which checks again once it is."""
    c = cfg.compression
    if c.compressor != "lowrank":
        return
    model = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=1)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        params = dict(LipschitzTransformer(model).named_parameters())
    if not cfg.model.vocab_size:
        del params["embed.weight"], params["head.weight"]
    elif cfg.optim.embed == "adam":
        del params["embed.weight"]  # DeepSpeed's, reduced densely by DeepSpeed
    try:
        for name, p in params.items():
            factor_rank(name, tuple(p.shape), c.rank, c.ratio)
    except ConfigError as exc:
        raise ConfigError(f"compression: {exc}") from None


def check_distributed(cfg: Config, env: Placement) -> None:
    """The launch: world size against the batch, what one process or many can run, and a user
    DeepSpeed JSON (missing or contradicting the config)."""
    t = cfg.train
    if t.batch_size % (env.world_size * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by world size {env.world_size} × "
                          f"train.grad_accum={t.grad_accum}; pick a batch size that is")
    if env.world_size == 1 and cfg.compression.enabled:
        c = cfg.compression
        what = f"sync_every={c.sync_every}" if c.sync_every != 1 else f"compressor={c.compressor}"
        raise ConfigError(f"compression.{what} needs ≥ 2 processes (one process "
                          "has no communication to compress): launch with torchrun --nproc_per_node 2 or more, or "
                          "leave compression at its defaults")
    if cfg.compression.compressor == "int4_sum":
        try:
            sum_levels(env.world_size)  # int8 holds the sum of at most 127 ranks' codes
        except ConfigError as exc:
            raise ConfigError(f"compression: {exc}") from None
    if env.world_size > 1 and cfg.optim.name == "adamw":
        raise ConfigError("the AdamW baseline runs on one process; use optim.name=muon for sharded training")
    if env.world_size > 1 and cfg.dist.zero_stage > 0 and cfg.optim.embed != "adam":
        raise ConfigError(f"dist.zero_stage={cfg.dist.zero_stage} shards Adam state, but optim.embed=colnorm leaves "
                          "DeepSpeed no parameters (distlip's owner-computes step already shards every optimizer "
                          "state); set optim.embed=adam, or dist.zero_stage=0")
    if env.world_size > 1 or cfg.dist.deepspeed_config:
        deepspeed_config(cfg, env.world_size)

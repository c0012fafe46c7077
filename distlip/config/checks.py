"""Checks on a built configuration: `validate` (cross-field rules that need nothing but the
config) and `preflight` (the rules that need the launch environment: world size, devices),
run before any data, process-group or DeepSpeed work so a mistake costs one line, not a job."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from distlip.config.schema import Config, DataConfig
from distlip.errors import ConfigError, did_you_mean


class Placement(Protocol):
    """Where this process runs in the job (a `distributed.env.DistEnv`)."""

    world_size: int
    local_rank: int


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_data(d: DataConfig) -> None:
    """The data section alone (also used by `distlip tokenizer train`, which has no model)."""
    sources = ("shakespeare", "text", "jsonl", "parquet", "hub")
    _require(d.source in sources,
             f"data.source='{d.source}' is unknown{did_you_mean(d.source, sources)}; use one of {', '.join(sources)}")
    _require(d.source in ("shakespeare", "hub") or d.path,
             f"data.source={d.source} needs data.path (a file, glob or directory)")
    _require(d.source != "hub" or d.name, "data.source=hub needs data.name, e.g. HuggingFaceFW/fineweb")
    _require(0 < d.val_fraction < 1, "data.val_fraction must be in (0, 1)")
    _require(d.val_tokens >= 0 and d.shuffle_buffer >= 0, "data.val_tokens and data.shuffle_buffer must be ≥ 0")
    _require(d.text_sample_by in ("document", "paragraph", "line"),
             f"data.text_sample_by='{d.text_sample_by}' is unknown; use document, paragraph or line")
    _require(d.epochs >= 0, f"data.epochs={d.epochs} must be ≥ 0 (0 repeats the stream forever)")
    _require(d.prefetch >= 1, f"data.prefetch={d.prefetch} must be ≥ 1 (batches prepared ahead)")


def _check_soft_cap_step(cfg: Config) -> None:
    """With Muon, the soft cap's coupling needs the largest update norm μ = lr·mult·1.14502·margin
    to stay ≤ 0.3·cap for every group (beyond that the composite overshoots the cap): refuse
    before training."""
    from distlip.lipschitz.budget import soft_cap_floors
    from distlip.lipschitz.caps import group_caps
    from distlip.lipschitz.constraints import SOFT_CAP_MAX_MU

    c, o = cfg.constraint, cfg.optim
    if c.target_bound > 0:
        return  # the target's allocation keeps every cap above its floor (or refuses the target)
    caps = group_caps(c)
    for group, floor in soft_cap_floors(cfg).items():
        _require(caps[group] >= floor,
                 f"soft cap: the {group} matrices' Muon step (lr·mult·1.145·margin = {floor * SOFT_CAP_MAX_MU:.3g}) "
                 f"exceeds {SOFT_CAP_MAX_MU}·cap = {SOFT_CAP_MAX_MU * caps[group]:.3g}, so the cap would overshoot; "
                 f"lower optim.lr to ≤ {o.lr * caps[group] / floor:.3g}, raise the cap (constraint.caps.{group} or "
                 "constraint.sigma_max), or use constraint.method=hard_cap")


def validate(cfg: Config) -> None:
    """Cross-field checks that do not need data, devices or process groups."""
    from distlip.lipschitz.budget import check_target
    from distlip.lipschitz.caps import check_caps
    from distlip.lipschitz.constraints import check_method  # local: constraints imports torch

    m, c, o, d, t = cfg.model, cfg.constraint, cfg.optim, cfg.data, cfg.train
    _require(m.d_model > 0 and m.n_layers > 0 and m.n_heads > 0, "model.d_model, n_layers and n_heads must be positive")
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; pick a divisor")
    d_head = m.d_model // m.n_heads
    rot = int(d_head * m.rotary_fraction)
    _require(0.0 <= m.rotary_fraction <= 1.0 and rot % 2 == 0,
             f"model.rotary_fraction={m.rotary_fraction} must give an even number of rotating dims per head "
             f"(d_head={d_head})")
    _require(m.context > 0, "model.context must be positive")
    _require(m.pad_vocab_to >= 1, "model.pad_vocab_to must be ≥ 1")
    check_method(c.method)
    _require(c.sigma_max > 0, f"constraint.sigma_max={c.sigma_max} must be > 0 (it is the cap on each matrix)")
    check_caps(c.caps)
    _require(c.target_bound >= 0, f"constraint.target_bound={c.target_bound} must be ≥ 0 (0: no target)")
    if c.target_bound > 0:
        check_target(cfg)
    _require(c.power_iters >= 1, "constraint.power_iters must be ≥ 1")
    _check_soft_cap_step(cfg)
    _require(o.name in ("muon", "adamw"),
             f"optim.name='{o.name}' is unknown{did_you_mean(o.name, ['muon', 'adamw'])}; use muon or adamw")
    _require(o.embed in ("colnorm", "adam"), f"optim.embed='{o.embed}' is unknown; use colnorm or adam")
    unknown = set(o.lr_mult) - {"embed", "head", "qkv", "out", "mlp"}
    _require(not unknown, f"optim.lr_mult has unknown groups {sorted(unknown)}; groups are embed, head, qkv, out, mlp")
    _require(o.lr > 0, "optim.lr must be > 0")
    _require(0 < o.depth_lr_decay <= 1, f"optim.depth_lr_decay={o.depth_lr_decay} must be in (0, 1] "
             "(1.0 is off; 0.5 halves the step per block toward the input)")
    _require(0 <= o.momentum < 1 and 0 <= o.momentum_start < 1, "optim.momentum values must be in [0, 1)")
    _require(0 <= o.decay_start <= 1 and 0 <= o.final_lr_frac <= 1,
             "optim.decay_start and optim.final_lr_frac must be in [0, 1]")
    _require(len(o.betas) == 2, "optim.betas must be two numbers, e.g. [0.9, 0.95]")
    validate_data(d)
    _require(t.steps > 0 and t.batch_size > 0 and t.grad_accum > 0,
             "train.steps, batch_size and grad_accum must be positive")
    _require(t.batch_size % t.grad_accum == 0,
             f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    _require(t.logits_chunk_mib > 0,
             f"train.logits_chunk_mib={t.logits_chunk_mib} must be > 0 (MiB of logits computed at once)")
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device='{t.device}' is unknown; use auto, cpu or cuda")
    _require(t.dtype in ("float32", "bfloat16"), f"train.dtype='{t.dtype}' is unknown; use float32 or bfloat16")
    _require(cfg.dist.timeout > 0,
             f"dist.timeout={cfg.dist.timeout} must be a positive number of seconds (default 300)")
    _require(cfg.dist.zero_stage in (0, 1, 2, 3),
             f"dist.zero_stage={cfg.dist.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    _require(t.diverge_patience >= 0 and t.diverge_grace >= 0,
             "train.diverge_patience and train.diverge_grace must be ≥ 0")
    _require(t.log_every > 0 and t.eval_every >= 0 and t.certify_every >= 0,
             "train.log_every must be > 0; eval_every and certify_every ≥ 0")
    _require(0 <= cfg.data.seq_len <= cfg.model.context,
             f"data.seq_len={cfg.data.seq_len} is longer than model.context={cfg.model.context}: the rotary table "
             f"and the certificate cover model.context positions; set data.seq_len ≤ {cfg.model.context} "
             "(0 uses model.context) or raise model.context")
    validate_compression(cfg)


def validate_compression(cfg: Config) -> None:
    """The compression block, by the compress package's own checks, and what it can be combined with."""
    from distlip.compress import check, estimator_name  # local: the compress package imports torch

    c = cfg.compression
    try:
        check(c)
    except ConfigError as exc:
        raise ConfigError(f"compression: {exc}") from None
    _require(not c.enabled or cfg.optim.name == "muon",
             "compression applies to distlip's sharded Muon path (matrices and the colnorm embedding); "
             "use optim.name=muon, or leave compression.compressor=identity")
    _require(c.ef21_eta_sent is None or estimator_name(c) == "ef21",
             f"compression.ef21_eta_sent applies to the ef21 estimator, not {estimator_name(c)}; "
             "drop it or set compression.estimator=ef21")
    _require(not (c.enabled and estimator_name(c) == "ef21" and c.ef21_eta < 1 and cfg.optim.nesterov),
             f"compression.ef21_eta={c.ef21_eta} makes EF21 carry the momentum (β = 1 − η) and Muon then steps "
             "without its own, which the Nesterov form cannot express; set optim.nesterov=false or "
             "compression.ef21_eta=1.0")
    check_outer_loop(cfg)


def check_outer_loop(cfg: Config) -> None:
    """The local-step outer loop (compression.sync_every = H > 1) and the options it cannot honour."""
    from distlip.compress import estimator_name  # local: the compress package imports torch

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


def preflight(cfg: Config, env: Placement) -> None:
    """Every refusal that needs the launch environment, run first by the trainer: before data is
    read, the process group starts or DeepSpeed is initialised."""
    from distlip.lipschitz.constraints import check_coefficients  # local: constraints imports torch

    check_distributed(cfg, env)
    check_device(cfg, env.local_rank)
    t, c = cfg.train, cfg.constraint
    _require(t.save_every >= 0, f"train.save_every={t.save_every} must be ≥ 0 (0: checkpoint at the end only)")
    _require(t.keep_last >= 1, f"train.keep_last={t.keep_last}: keep at least 1 checkpoint")
    check_coefficients(c.method, c.weight_decay, c.spectral_wd, c.power_iters)


def check_output_dir(out: Path) -> None:
    """The run directory can be created and written: a read-only or unwritable `train.out` is
    refused at start-up, not at the first checkpoint hours later. Nothing is left behind (a run
    refused later must not leave an empty directory): the nearest existing directory is probed."""
    there = next(p for p in (out, *out.parents) if p.exists())
    probe = there / f".distlip-write-test-{os.getpid()}"
    try:
        if not there.is_dir():
            raise NotADirectoryError(f"{there} is a file")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {out} is not writable ({err.strerror or err}): choose another --out "
                          "(train.out), or make it writable") from None


def check_distributed(cfg: Config, env: Placement) -> None:
    """Everything that can be refused before any process-group work."""
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
    if env.world_size > 1 and cfg.optim.name == "adamw":
        raise ConfigError("the AdamW baseline runs on one process; use optim.name=muon for sharded training")
    if env.world_size > 1 and cfg.dist.zero_stage > 0 and cfg.optim.embed != "adam":
        raise ConfigError(f"dist.zero_stage={cfg.dist.zero_stage} shards Adam state, but optim.embed=colnorm leaves "
                          "DeepSpeed no parameters (distlip's owner-computes step already shards every optimizer "
                          "state); set optim.embed=adam, or dist.zero_stage=0")
    if env.world_size > 1 or cfg.dist.deepspeed_config:
        from distlip.distributed.deepspeed import deepspeed_config  # local: it reads only the schema

        deepspeed_config(cfg, env.world_size)  # refuses a missing or contradicting user JSON early


def check_device(cfg: Config, local_rank: int = 0) -> None:
    """The device refusals of `distributed.env.select_device`: a GPU asked for and missing, bf16 on
    CPU, or more ranks on a node than GPUs."""
    import torch  # local: the config loads without torch

    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.dtype == "bfloat16" and want == "cpu":
        raise ConfigError("train.dtype=bfloat16 runs on GPUs only here (CPU bf16 autocast is slow and "
                          "inexact for this model); use train.dtype=float32 on CPU")
    if want == "cuda" and local_rank >= torch.cuda.device_count():
        # NCCL refuses two ranks on one GPU, and a missing ordinal fails deep inside CUDA.
        raise ConfigError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                          "NCCL needs one GPU per process; launch at most that many processes per node, "
                          "or set train.device=cpu")

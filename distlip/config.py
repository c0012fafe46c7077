"""One typed configuration: YAML presets in `configs/`, dotted overrides from the command line.

`load_config(path, overrides)` reads a YAML file, applies `section.key=value` overrides,
builds the nested dataclasses and validates them, so every mistake is reported at start-up
as one `ConfigError` line that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from distlip.errors import ConfigError


@dataclass
class ModelConfig:
    """The Lipschitz transformer (SPEC §1). Sizes are counts; `context` is tokens."""

    vocab_size: int = 0  # 0: taken from the tokenizer
    pad_vocab_to: int = 1  # head rows rounded up to a multiple of this (64 for GPU matmuls)
    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 4
    mlp_ratio: int = 4
    context: int = 256
    rotary_base: float = 10000.0
    rotary_fraction: float = 1.0  # fraction of each head's dimensions that rotate
    attn_scale: float = 1.0  # s: logits are s·q·k/d_head
    logit_scale: float = 1.0  # final scale on the head's output


@dataclass
class ConstraintConfig:
    """Weight constraint applied after every optimiser step (SPEC §2)."""

    method: str = "soft_cap"
    sigma_max: float = 1.0  # cap on every matrix whose group has none in `caps`, RMS→RMS units
    # Per-group caps: embed (largest token RMS), qk, v, o, mlp_in, mlp_out, head (RMS→RMS).
    caps: dict = field(default_factory=dict)
    per_head: bool = True  # W_q, W_k, W_v capped per attention head (what the certificate reads)
    # > 0: caps chosen so the certificate with every norm at its cap is ≤ this (caps give the ratios)
    target_bound: float = 0.0
    weight_decay: float = 0.0  # λ for weight_decay (multiplied by lr)
    spectral_wd: float = 0.0  # λ for spectral_weight_decay (not multiplied by lr)
    margin: float = 1.05  # safety factor on Muon's update-norm bound for the soft-cap coupling
    power_iters: int = 3  # warm-started power iterations per step
    embed_cap: bool = True  # token vectors capped to RMS ≤ caps.embed (default 1)


@dataclass
class OptimConfig:
    """Optimisers and learning-rate schedule (SPEC §1.1, §1.2, §4)."""

    name: str = "muon"  # muon | adamw (matrices); embedding per `embed`
    lr: float = 0.1
    lr_mult: dict = field(default_factory=lambda: {
        "embed": 0.05, "head": 0.05, "qkv": 0.9, "out": 0.3, "mlp": 0.3})
    momentum: float = 0.9
    momentum_start: float = 0.9  # Muon momentum warms from this ...
    momentum_warmup: int = 0  # ... to `momentum` over this many steps
    nesterov: bool = False  # False: EMA momentum (small model); True: Nesterov (145M)
    embed: str = "colnorm"  # colnorm (per-token normalised step) | adam
    embed_growth_cap: float = 16.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW's decoupled decay (baseline optimiser only)
    warmup_steps: int = 0
    decay_start: float = 0.0  # fraction of steps at constant lr before the linear decay
    final_lr_frac: float = 0.0  # lr at the last step, as a fraction of lr
    depth_lr_decay: float = 1.0  # block i's matrices step at lr·decay^(n_layers−1−i) (1.0: off)


@dataclass
class DataConfig:
    """Where tokens come from (SPEC §7)."""

    source: str = "shakespeare"  # shakespeare (packaged) | text | jsonl | parquet | hub
    path: str = ""  # file, glob or directory for local sources
    name: str = ""  # hub dataset name, e.g. HuggingFaceFW/fineweb
    subset: str = ""  # hub config name, e.g. sample-10BT
    split: str = "train"
    text_column: str = "text"
    tokenizer: str = "char"  # char | gpt2 | path to a tokenizer.json
    val_fraction: float = 0.1  # held-out tail for in-memory sources
    val_tokens: int = 0  # streaming: tokens held out for validation (0: none)
    shuffle_buffer: int = 1000  # streaming: documents
    skip_bad_files: bool = False  # streaming: skip undecodable files with a warning
    text_sample_by: str = "document"  # text files: one document per file | paragraph | line
    epochs: int = 0  # streaming: passes over the source before it ends (0: repeat forever)
    prefetch: int = 4  # streaming: batches prepared ahead by the background thread
    seq_len: int = 0  # tokens per training row (0: model.context; at most model.context)
    document_mask: bool = False  # attend only within a document (packed rows; needs the tokenizer's EOT)
    restart_on_resize: bool = False  # resume at another world size restarts a per-rank stream (else refused)


@dataclass
class TrainConfig:
    """The loop: batch, steps, evaluation, logging, checkpoints."""

    steps: int = 2000
    batch_size: int = 64  # sequences per step, summed over ranks and accumulation
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast; master weights stay fp32)
    threads: int = 0  # CPU threads (0: torch's default)
    log_every: int = 10
    eval_every: int = 250
    eval_windows: int = 0  # validation windows per periodic eval (0: whole split)
    certify_every: int = 1  # cheap certificate every N steps
    exact_certify_every: int = 0  # exact SVD certificate every N steps (0: end only)
    save_every: int = 0  # sharded checkpoint every N steps (0: end only)
    keep_last: int = 3
    out: str = "runs/default"
    resume: str = ""  # "" fresh | auto | tag or path
    tensorboard: bool = True
    progress: bool = True
    diverge_patience: int = 4  # stop after this many consecutive logged losses above ln(vocab) (0: never)
    diverge_grace: int = 50  # ... counted only after this many steps


@dataclass
class DistConfig:
    """Sharding over ranks with DeepSpeed (used when world size > 1 or zero_stage > 0)."""

    zero_stage: int = 0
    deepspeed_config: str = ""  # optional user JSON; must agree with this config


@dataclass
class CompressionConfig:
    """Compressed communication between ranks (SPEC §5), built and validated by
    `distlip.compress.CompressionConfig` (same field names). The default, identity with no
    estimator named, keeps the engine's dense reduce-to-owner path.

    compressor: identity | randk | randk_unscaled | topk, keeping `ratio` ∈ (0, 1] of each tensor.
    estimator: dense | plain | diana | marina | ef21 | ef14; None picks dense (identity),
      diana (randk) or ef21 (topk, randk_unscaled).
    warmup_steps: dense steps before compression starts (they initialise the estimators).
    shared_seed, seed: Rand-k masks shared by every rank (values summed by reduce-scatter) or per rank.
    marina_p: MARINA's dense-round probability (None: k/d). marina_same_batch: MARINA's difference
      g(x⁺) − g(x) on one minibatch, by a second backward pass at the previous weights (true: the
      published method), or against the previous step's gradient in one pass (false: it drifts).
    ef21_eta: EF21's momentum weight η; below 1 the estimator's momentum replaces Muon's
      (β = 1 − η; 0.1 with Top-k at 1–10%).
    ef21_eta_sent: η of the momentum a rank compresses and sends (every share but an owner's
      own, which keeps ef21_eta); None: ef21_eta. EF21 tracks a slower momentum far better
      (0.01 with Top-k 1%; docs/compression.md). Needs ef21_eta < 1.
    allow_plain: run the plain estimator where it is known to fail (scaled Rand-k < 10%, Top-k).
    exact_own: each tensor's owner uses its own share of the aggregate uncompressed (it never
      crosses the wire: same bytes, (M−1)/M of the aggregate compressed on M ranks); false
      compresses it like every other rank's share, as the published estimators do.
    downlink, downlink_ratio: identity | topk | randk_unscaled for the weights owners send back (EF21-P).
    """

    compressor: str = "identity"
    ratio: float = 1.0
    estimator: str | None = None
    warmup_steps: int = 10
    shared_seed: bool = True
    seed: int = 0
    marina_p: float | None = None
    marina_same_batch: bool = True
    ef21_eta: float = 1.0
    ef21_eta_sent: float | None = None
    allow_plain: bool = False
    exact_own: bool = True
    downlink: str = "identity"
    downlink_ratio: float = 1.0

    @property
    def enabled(self) -> bool:
        """Whether gradients go through an estimator (or weights through a compressed downlink)."""
        return self.compressor != "identity" or self.estimator is not None or self.downlink != "identity"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def seq_len(self) -> int:
        """Tokens per training row: data.seq_len, or model.context when it is 0."""
        return self.data.seq_len or self.model.context

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the dataclass field's type, or raise ConfigError."""
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if typ is dict and isinstance(value, dict):
        return dict(value)
    arms = get_args(typ)
    if type(None) in arms:  # `X | None`: None, or a value of X
        return None if value is None else _coerce(value, next(a for a in arms if a is not type(None)), key)
    base = get_origin(typ) or typ
    if isinstance(base, type) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_closest(key, names)}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, typ, full)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """CLI override values are YAML scalars: 0.1, true, [0.9, 0.95], {embed: 0.1}, text."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.steps=20")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
        node[parts[-1]] = _parse_value(text)
    return data


def _check_fields(cls, data: dict, prefix: str = "") -> None:
    """Reject unknown keys anywhere before defaults are merged (gives the closest name)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(key, names)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_fields(hints[key], value, f"{prefix}{key}.")


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset, apply overrides, build and validate the Config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found; presets live in configs/ (e.g. configs/shakespeare.yaml)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    apply_overrides(data, overrides or [])
    _check_fields(Config, data)
    defaults = Config().to_dict()
    cfg = _build(Config, _merge(defaults, data), "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with `to_dict` (e.g. a run's config.json). Configs saved before
    per-group caps (`head_sigma_max`, no `per_head`) load as what they were: whole-matrix caps."""
    c = data.get("constraint")
    if isinstance(c, dict) and "per_head" not in c:
        head = c.pop("head_sigma_max", 0.0)
        data = {**data, "constraint": {**c, "per_head": False, **({"caps": {"head": head}} if head else {})}}
    _check_fields(Config, data)
    cfg = _build(Config, _merge(Config().to_dict(), data), "")
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_data(d: DataConfig) -> None:
    """The data section alone (also used by `distlip tokenizer train`, which has no model)."""
    sources = ("shakespeare", "text", "jsonl", "parquet", "hub")
    _require(d.source in sources, f"data.source='{d.source}' is unknown{_closest(d.source, sources)}; use one of {', '.join(sources)}")
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
    to stay ≤ 0.3·σmax (beyond that the composite overshoots the cap): refuse before training."""
    from distlip.constraints import SOFT_CAP_MAX_MU
    from distlip.lipschitz.caps import group_caps

    from distlip.lipschitz.budget import soft_cap_floors

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
    from distlip.constraints import check_method  # local: constraints imports torch
    from distlip.lipschitz.budget import check_target
    from distlip.lipschitz.caps import check_caps

    m, c, o, d, t = cfg.model, cfg.constraint, cfg.optim, cfg.data, cfg.train
    _require(m.d_model > 0 and m.n_layers > 0 and m.n_heads > 0, "model.d_model, n_layers and n_heads must be positive")
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; pick a divisor")
    d_head = m.d_model // m.n_heads
    rot = int(d_head * m.rotary_fraction)
    _require(0.0 <= m.rotary_fraction <= 1.0 and rot % 2 == 0,
             f"model.rotary_fraction={m.rotary_fraction} must give an even number of rotating dims per head (d_head={d_head})")
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
    _require(o.name in ("muon", "adamw"), f"optim.name='{o.name}' is unknown{_closest(o.name, ['muon', 'adamw'])}; use muon or adamw")
    _require(o.embed in ("colnorm", "adam"), f"optim.embed='{o.embed}' is unknown; use colnorm or adam")
    unknown = set(o.lr_mult) - {"embed", "head", "qkv", "out", "mlp"}
    _require(not unknown, f"optim.lr_mult has unknown groups {sorted(unknown)}; groups are embed, head, qkv, out, mlp")
    _require(o.lr > 0, "optim.lr must be > 0")
    _require(0 < o.depth_lr_decay <= 1, f"optim.depth_lr_decay={o.depth_lr_decay} must be in (0, 1] "
             "(1.0 is off; 0.5 halves the step per block toward the input)")
    _require(0 <= o.momentum < 1 and 0 <= o.momentum_start < 1, "optim.momentum values must be in [0, 1)")
    _require(0 <= o.decay_start <= 1 and 0 <= o.final_lr_frac <= 1, "optim.decay_start and optim.final_lr_frac must be in [0, 1]")
    _require(len(o.betas) == 2, "optim.betas must be two numbers, e.g. [0.9, 0.95]")
    validate_data(d)
    _require(t.steps > 0 and t.batch_size > 0 and t.grad_accum > 0, "train.steps, batch_size and grad_accum must be positive")
    _require(t.batch_size % t.grad_accum == 0,
             f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device='{t.device}' is unknown; use auto, cpu or cuda")
    _require(t.dtype in ("float32", "bfloat16"), f"train.dtype='{t.dtype}' is unknown; use float32 or bfloat16")
    _require(cfg.dist.zero_stage in (0, 1, 2, 3),
             f"dist.zero_stage={cfg.dist.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    _require(t.diverge_patience >= 0 and t.diverge_grace >= 0, "train.diverge_patience and train.diverge_grace must be ≥ 0")
    _require(t.log_every > 0 and t.eval_every >= 0 and t.certify_every >= 0, "train.log_every must be > 0; eval_every and certify_every ≥ 0")
    _require(0 <= cfg.data.seq_len <= cfg.model.context,
             f"data.seq_len={cfg.data.seq_len} is longer than model.context={cfg.model.context}: the rotary table "
             f"and the certificate cover model.context positions; set data.seq_len ≤ {cfg.model.context} "
             "(0 uses model.context) or raise model.context")
    validate_compression(cfg)


def validate_compression(cfg: Config) -> None:
    """The compression block, by the compress package's own checks, and what it can be combined with."""
    from distlip.compress import CompressionConfig as Block  # local: the compress package imports torch

    c = cfg.compression
    try:
        block = Block(**dataclasses.asdict(c))
    except ConfigError as exc:
        raise ConfigError(f"compression: {exc}") from None
    _require(not c.enabled or cfg.optim.name == "muon",
             "compression applies to distlip's sharded Muon path (matrices and the colnorm embedding); "
             "use optim.name=muon, or leave compression.compressor=identity")
    _require(c.ef21_eta_sent is None or block.estimator_name == "ef21",
             f"compression.ef21_eta_sent applies to the ef21 estimator, not {block.estimator_name}; "
             "drop it or set compression.estimator=ef21")
    _require(not (c.enabled and block.estimator_name == "ef21" and c.ef21_eta < 1 and cfg.optim.nesterov),
             f"compression.ef21_eta={c.ef21_eta} makes EF21 carry the momentum (β = 1 − η) and Muon then steps "
             "without its own, which the Nesterov form cannot express; set optim.nesterov=false or "
             "compression.ef21_eta=1.0")

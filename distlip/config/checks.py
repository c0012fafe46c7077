"""Checks on a built configuration that need nothing but the config: `validate` (run by
`load_config`), the run directory and the device. The config package is the ground floor and
imports nothing above it; the refusals that need the packages above (the soft cap's floors, a
target bound's certificate, building the compressors, a DeepSpeed JSON) are in
`distlip.preflight`, which the trainer runs before any data, process-group or DeepSpeed work."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

from distlip.config.choices import ATTENTION, GROUPS, METHODS
from distlip.config.schema import Config, DataConfig
from distlip.errors import ConfigError, did_you_mean


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


def check_method(name: str) -> str:
    """Return `name` if it is one of METHODS, else raise ConfigError naming the closest."""
    if name in METHODS:
        return name
    raise ConfigError(f"unknown constraint method {name!r}{did_you_mean(str(name), METHODS)}; "
                      f"choose from {', '.join(METHODS)}")


def check_caps(caps: dict, key: str = "constraint.caps") -> None:
    """Every key a known cap group and every cap a finite number > 0, or one ConfigError line."""
    for group, cap in caps.items():
        if group not in GROUPS:
            raise ConfigError(f"{key} has unknown group {group!r}{did_you_mean(str(group), GROUPS)}; "
                              f"groups are {', '.join(GROUPS)}")
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise ConfigError(f"{key}.{group}={cap!r} must be a finite number > 0 (an RMS→RMS cap)")


def check_coefficients(method: str, weight_decay: float, spectral_wd: float, power_iters: int) -> None:
    """The method's coefficients: each method gets the ones it uses and no others."""
    if weight_decay < 0 or spectral_wd < 0 or power_iters < 1:
        raise ConfigError("weight_decay and spectral_wd must be >= 0 and power_iters >= 1; fix the "
                          "constraint settings")
    if method == "weight_decay" and weight_decay == 0:
        raise ConfigError("method 'weight_decay' needs weight_decay > 0; set weight_decay")
    if method == "spectral_weight_decay" and spectral_wd == 0:
        raise ConfigError("method 'spectral_weight_decay' needs spectral_wd > 0; set spectral_wd")
    if method != "spectral_weight_decay" and spectral_wd > 0:
        raise ConfigError(f"spectral_wd is only used by method 'spectral_weight_decay', not {method!r}; "
                          "remove it or change the method")
    if method == "none" and weight_decay > 0:
        raise ConfigError("method 'none' applies no weight decay; use method 'weight_decay'")


def validate(cfg: Config) -> None:
    """Cross-field checks that do not need data, devices, process groups or any package above
    the config (those are in `distlip.preflight`)."""
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
    _require(len(m.lookback) <= m.n_heads and all(isinstance(b, int) and 0 <= b < m.context for b in m.lookback),
             f"model.lookback={m.lookback} must list at most model.n_heads={m.n_heads} whole numbers of tokens back, "
             f"each in [0, model.context={m.context}) (0: no positional bias for that head)")
    _require(m.lookback_bias > 0 and math.isfinite(m.lookback_bias),
             f"model.lookback_bias={m.lookback_bias} must be a positive finite score (8 puts ≈ 97% of a query's "
             "weight on its key among a hundred others)")
    _require(0.0 <= m.dropout < 1.0,
             f"model.dropout={m.dropout} must be a probability in [0, 1) (0: no dropout; 0.1–0.2 against overfitting)")
    _require(m.pad_vocab_to >= 1, "model.pad_vocab_to must be ≥ 1")
    check_method(c.method)
    _require(c.sigma_max > 0, f"constraint.sigma_max={c.sigma_max} must be > 0 (it is the cap on each matrix)")
    check_caps(c.caps)
    _require(c.target_bound >= 0, f"constraint.target_bound={c.target_bound} must be ≥ 0 (0: no target)")
    _require(c.power_iters >= 1, "constraint.power_iters must be ≥ 1")
    check_coefficients(c.method, c.weight_decay, c.spectral_wd, c.power_iters)
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
    _require(t.attention in ATTENTION, f"train.attention='{t.attention}' is unknown"
             f"{did_you_mean(t.attention, ATTENTION)}; use sdpa (the default) or flex")
    _require(not (t.attention == "flex" and any(cfg.model.lookback)),
             "model.lookback's positional bias runs through SDPA only; set train.attention=sdpa or drop model.lookback")
    _require(cfg.dist.timeout > 0,
             f"dist.timeout={cfg.dist.timeout} must be a positive number of seconds (default 300)")
    _require(cfg.dist.zero_stage in (0, 1, 2, 3),
             f"dist.zero_stage={cfg.dist.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    _require(t.diverge_patience >= 0 and t.diverge_grace >= 0,
             "train.diverge_patience and train.diverge_grace must be ≥ 0")
    _require(t.loss_temperature > 0 and math.isfinite(t.loss_temperature),
             f"train.loss_temperature={t.loss_temperature} must be a positive finite factor on the logits "
             f"in the training loss (1: the plain cross-entropy)")
    _require(0 < t.teacher_weight <= 1, f"train.teacher_weight={t.teacher_weight} must be in (0, 1] (the weight of "
             "the teacher's predictions in the loss; 1: the teacher's alone)")
    _require(not t.teacher or d.in_memory,
             f"train.teacher needs the in-memory character corpora (data.source shakespeare or text, "
             f"data.tokenizer char), not data.source={d.source}: the teacher predicts the training split once, "
             "before training")
    _require(not t.teacher or Path(t.teacher).exists(),
             f"train.teacher '{t.teacher}' does not exist; give a run directory, checkpoint, exported model or "
             "ensemble directory")
    _require(t.log_every > 0 and t.eval_every >= 0 and t.certify_every >= 0,
             "train.log_every must be > 0; eval_every and certify_every ≥ 0")
    _require(0 <= cfg.data.seq_len <= cfg.model.context,
             f"data.seq_len={cfg.data.seq_len} is longer than model.context={cfg.model.context}: the rotary table "
             f"and the certificate cover model.context positions; set data.seq_len ≤ {cfg.model.context} "
             "(0 uses model.context) or raise model.context")
    _require(t.save_every >= 0, f"train.save_every={t.save_every} must be ≥ 0 (0: checkpoint at the end only)")
    _require(t.keep_last >= 1, f"train.keep_last={t.keep_last}: keep at least 1 checkpoint")
    _check_average(t)


def _check_average(t) -> None:
    """train.average_last reads checkpoints the run writes and keeps: refused at start-up when it
    would find fewer than it asks for at the end."""
    k = t.average_last
    _require(k >= 1, f"train.average_last={k} must be ≥ 1 (1: the last step's weights)")
    if k == 1:
        return
    _require(t.save_every > 0, f"train.average_last={k} averages checkpoints, and train.save_every=0 writes one at "
                               f"the end only: set train.save_every (e.g. {max(1, t.steps // (4 * k))})")
    _require(t.keep_last >= k, f"train.average_last={k} needs the last {k} checkpoints, and train.keep_last="
                               f"{t.keep_last} keeps fewer: set train.keep_last ≥ {k}")
    _require((k - 1) * t.save_every < t.steps,
             f"train.average_last={k} × train.save_every={t.save_every} reaches back past step 0 of "
             f"train.steps={t.steps}: lower one of them")


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
    check_kernels(cfg, want)


def check_kernels(cfg: Config, device_type: str) -> None:
    """The fast path's kernels exist here (docs/memory.md#fast-path): FlexAttention traces itself
    with torch.compile (even uncompiled), FlexAttention and torch.compile run through Triton on
    GPUs, FlexAttention trains on CPUs only where torch has its backward there, and
    torch.compile needs a C++ compiler on CPUs."""
    import importlib.util
    import shutil

    import torch._dynamo.config  # local: the config loads without torch

    t = cfg.train
    compile_disabled = torch._dynamo.config.disable  # TORCH_COMPILE_DISABLE=1
    if t.attention == "flex" and compile_disabled:
        raise ConfigError("train.attention=flex runs FlexAttention through torch.compile's tracer, which "
                          "TORCH_COMPILE_DISABLE=1 turns off (the Makefile sets it): unset it, or use "
                          "train.attention=sdpa")
    wanted = [s for s, on in (("train.attention=flex", t.attention == "flex"), ("train.compile=true", t.compile)) if on]
    if device_type == "cuda" and wanted and importlib.util.find_spec("triton") is None:
        raise ConfigError(f"{' and '.join(wanted)} need{'s' if len(wanted) == 1 else ''} Triton on GPUs, which "
                          f"torch {torch.__version__} here lacks: "
                          "install the triton release built for it (torch's CUDA wheels depend on one), or set "
                          "train.attention=sdpa train.compile=false")
    if device_type == "cuda" and t.attention == "flex" and not t.compile:
        raise ConfigError("train.attention=flex without train.compile=true runs FlexAttention unfused, which "
                          "materialises (B, heads, T, T) scores that the memory model does not count: set "
                          "train.compile=true, or use train.attention=sdpa")
    if device_type == "cpu" and t.attention == "flex" and not _flex_backward_on_cpu():
        raise ConfigError(f"train.attention=flex trains on GPUs only: FlexAttention in torch {torch.__version__} has "
                          "no backward on CPU; use train.attention=sdpa (the same function) on CPU")
    if device_type == "cpu" and t.compile and not shutil.which(os.environ.get("CXX") or "g++"):
        raise ConfigError("train.compile=true needs a C++ compiler on CPU (torch.compile's inductor): install g++ "
                          "(or set CXX), or set train.compile=false")
    if t.compile and compile_disabled:
        warnings.warn("train.compile=true but TORCH_COMPILE_DISABLE=1 (the Makefile sets it): the model runs "
                      "eager; unset it to compile", stacklevel=2)


def _flex_backward_on_cpu() -> bool:
    """Whether this torch's FlexAttention accepts CPU inputs that need gradients (2.13 does not)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 16, 8, requires_grad=True)
    try:
        flex_attention(q, q, q)
    except NotImplementedError:
        return False
    return True

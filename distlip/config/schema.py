"""The run configuration's typed sections: plain dataclasses with defaults and no behaviour
beyond small accessors. Loading lives in `config.load`, cross-field checks in `config.checks`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """The Lipschitz transformer (docs/method.md#architecture). Sizes are counts; `context` is tokens."""

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
    # Positional heads: head h adds `lookback_bias` to its score for the key `lookback[h]` tokens
    # back (0 or no entry: none). Input-independent, so it costs nothing in the certificate.
    lookback: list = field(default_factory=list)
    lookback_bias: float = 8.0
    # Training only: each residual branch's output is dropped with this probability (inverted
    # dropout). Evaluation, export and the certificate see the network without it.
    dropout: float = 0.0


@dataclass
class ConstraintConfig:
    """Weight constraint applied after every optimiser step (docs/method.md#constraints)."""

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
    """Optimisers and learning-rate schedule (docs/method.md#muon)."""

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
    # Muon orthogonalises W_q, W_k, W_v per attention head: every head block's step is ≤ lr·gain
    # (a block of a whole-matrix step can reach √H times that)
    per_head: bool = False


@dataclass
class DataConfig:
    """Where tokens come from (docs/method.md#data)."""

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

    @property
    def in_memory(self) -> bool:
        """A character corpus held in memory (the packaged plays or one text file), not a stream."""
        return self.source in ("shakespeare", "text") and self.tokenizer == "char"


@dataclass
class TrainConfig:
    """The loop: batch, steps, evaluation, logging, checkpoints."""

    steps: int = 2000
    batch_size: int = 64  # sequences per step, summed over ranks and accumulation
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast; master weights stay fp32)
    # Fast path (docs/memory.md#fast-path), off until a GPU measurement says it is right and faster:
    attention: str = "sdpa"  # sdpa | flex (FlexAttention block mask for data.document_mask)
    compile: bool = False  # torch.compile each block and Muon's Newton–Schulz
    threads: int = 0  # CPU threads (0: torch's default)
    log_every: int = 10
    eval_every: int = 250
    eval_windows: int = 0  # validation windows per periodic eval (0: whole split)
    logits_chunk_mib: float = 256.0  # float32 logits materialised at once (tokens × vocabulary), MiB
    # refuse a micro-batch predicted above this (0: the GPU's memory, no check on CPU; < 0: off)
    max_memory_gib: float = 0.0
    certify_every: int = 1  # cheap certificate every N steps
    exact_certify_every: int = 0  # exact SVD certificate every N steps (0: end only)
    save_every: int = 0  # sharded checkpoint every N steps (0: end only)
    keep_last: int = 3
    # K > 1: the model evaluated, certified and exported at the end is the mean of the weights at the
    # run's last K checkpoints (every save_every steps up to the last); 1: the last step's weights
    average_last: int = 1
    out: str = "runs/default"
    resume: str = ""  # "" fresh | auto | tag or path
    tensorboard: bool = True
    progress: bool = True
    diverge_patience: int = 4  # stop after this many consecutive logged losses above ln(vocab) (0: never)
    diverge_grace: int = 50  # ... counted only after this many steps
    # τ: training minimises the cross-entropy of τ·logits. The model, its certificate and its
    # evaluation do not see τ; τ > 1 trades the logits' scale (loss) for their order (accuracy).
    loss_temperature: float = 1.0
    # distillation (distlip.teacher): a trained model or ensemble directory whose predictions of the
    # training text the loss also follows, with weight teacher_weight (α: (1 − α)·CE(text) + α·CE(teacher))
    teacher: str = ""
    teacher_weight: float = 0.5


@dataclass
class DistConfig:
    """Sharding over ranks with DeepSpeed (used when world size > 1 or zero_stage > 0)."""

    zero_stage: int = 0
    deepspeed_config: str = ""  # optional user JSON; must agree with this config
    # Seconds a rank waits for the others (every collective and barrier, and the start-up
    # rendezvous) before it fails and names the rank that stopped answering.
    timeout: float = 300.0


@dataclass
class CompressionConfig:
    """Compressed communication between ranks (docs/compression.md#formulas), built and validated by
    `distlip.compress.CompressionConfig` (same field names). The default, identity with no
    estimator named, keeps the engine's dense reduce-to-owner path.

    compressor: identity | randk | randk_unscaled | topk, keeping `ratio` ∈ (0, 1] of each tensor;
      int8 | int4: every coordinate, rounded in blocks of 64 to 8 or 4 bits (ratio 1.0);
      int4_sum: the same on block scales the ranks share, so the int8 codes are summed by an
      all-reduce (levels from the number of ranks, ≤ 127 ranks);
      or lowrank (PowerSGD with error feedback, all-reduced factors; docs/compression.md#low-rank).
    rank: lowrank's rank r for every matrix; None: round(ratio · the matrix's smaller side), ≥ 1.
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
    sync_every: H, optimiser steps per round of the local-step outer loop (docs/compression.md#the-outer-loop);
      1 exchanges gradients every step. Above 1 every rank steps the whole model on its own batch
      for H steps, then the ranks exchange pseudo-gradients (compressed by compressor / ratio /
      estimator above) and take one outer step.
    outer_lr, outer_momentum: the outer Nesterov step's learning rate and momentum (DiLoCo's 0.7, 0.9).
    """

    compressor: str = "identity"
    ratio: float = 1.0
    rank: int | None = None
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
    sync_every: int = 1
    outer_lr: float = 0.7
    outer_momentum: float = 0.9

    @property
    def enabled(self) -> bool:
        """Whether gradients go through an estimator (or weights through a compressed downlink, or
        pseudo-gradients through the outer loop)."""
        return (self.compressor != "identity" or self.estimator is not None or self.downlink != "identity"
                or self.sync_every != 1)


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

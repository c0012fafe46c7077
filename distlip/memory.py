"""Predicted peak memory per rank for a config, and the start-up check that refuses a
micro-batch that cannot fit (`train.max_memory_gib`).

The model counts tensor bytes (what `torch.cuda.max_memory_allocated` sees on a GPU; on a CPU,
resident memory above the process's baseline). Terms, per rank (docs/memory.md derives each):

- weights: every parameter in float32. The matrices are replicated on every rank (owner-computes
  shares updates, not weights); the embedding is partitioned only at ZeRO-3 under DeepSpeed.
- gradients: float32, full for every matrix (autograd fills them on every rank), partitioned for
  the DeepSpeed-held embedding at ZeRO-2/3.
- optimiser state: Muon's float32 momentum for the matrices this rank owns (the owner-computes
  plan), the embedding's Adam moments (÷ world at ZeRO ≥ 1, with DeepSpeed's float32 master
  partition) or its column-normalised momentum.
- activations per micro-batch: what autograd saves, measured per token and layer (exact in
  float32, `tests/unit/test_memory.py` counts it), plus the document mask: under SDPA the dense
  boolean mask and the additive copy each layer saves, under FlexAttention the block mask.
- logits: the chunked head (`distlip.loss`): two float32 `chunk × V` buffers, the head's own
  gradient, the hidden states' gradient.
- optimiser workspace: Newton–Schulz on the largest same-shape group of owned matrices.

Not modelled: compression estimators' state, DeepSpeed's communication buckets, the allocator's
fragmentation, the CPU runtime itself (torch, Python, the dataset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distlip.config.schema import Config, ModelConfig
from distlip.distributed.sharding import plan_ownership
from distlip.errors import ConfigError
from distlip.loss import FLOAT32_BYTES, LOGIT_BUFFERS, chunk_tokens
from distlip.model import FLEX_TILE

GIB = 2**30
# float32 copies of a same-shape group alive during Muon's step on it (measured: 7.2 for one
# 8192 × 768 matrix): the Nesterov direction, the stack, the normalised iterate, and an odd
# step's a·X, B·X and their sum.
NS_BUFFERS = 7


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Sequences per rank per micro-step."""
    t = cfg.train
    return t.batch_size // (world_size * t.grad_accum)


def padded_vocab(m: ModelConfig) -> int:
    return -(-m.vocab_size // m.pad_vocab_to) * m.pad_vocab_to


def param_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every parameter's shape by name, as `LipschitzTransformer` builds it (no model needed)."""
    d, h = m.d_model, m.mlp_ratio * m.d_model
    shapes = {"embed.weight": (m.vocab_size, d)}
    for i in range(m.n_layers):
        for k in "qkvo":
            shapes[f"blocks.{i}.attn.{k}.weight"] = (d, d)
        shapes[f"blocks.{i}.mlp.fc_in.weight"] = (h, d)
        shapes[f"blocks.{i}.mlp.fc_out.weight"] = (d, h)
    shapes["head.weight"] = (padded_vocab(m), d)
    return shapes


def activation_bytes_per_token_layer(m: ModelConfig, dtype: str) -> int:
    """Bytes autograd keeps per token per layer. float32: the block input (shared by q, k, v),
    q, k, v, rotated q and k, attention output, W_o's input, the MLP input, W_in's output and
    W_out's input (r·d each): (7 + 2r)·d floats, plus one float32 log-sum-exp per head.
    bfloat16 (autocast): each of q, k, v keeps its own bf16 cast of the input, as do W_o and
    W_in: (9 + 2r)·d halves, plus the float32 log-sum-exp."""
    d, r, heads = m.d_model, m.mlp_ratio, m.n_heads
    if dtype == "bfloat16":
        return 2 * (9 + 2 * r) * d + FLOAT32_BYTES * heads
    return FLOAT32_BYTES * ((7 + 2 * r) * d + heads)


def block_mask_bytes(batch: int, seq: int) -> int:
    """Bytes of FlexAttention's document block mask (`model.document_block_mask`) for `batch`
    rows of `seq` tokens: the int64 document ids, and for each of the n = ⌈seq/128⌉ query tiles
    four int32 counts and four int32 lists of n key tiles (partial and full tiles, and both
    transposed for the backward)."""
    n = -(-seq // FLEX_TILE)
    return batch * (8 * seq + 4 * 4 * (n * n + n))


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per rank, by term, and the peaks of each phase (bytes)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # one micro-batch's saved tensors
    logits: int  # the chunked head's buffers in training
    optimizer_workspace: int
    eval_working: int  # one evaluation forward (no grad) with its logits chunk
    certificate_workspace: int  # float64 copies for the exact SVD and the embedding's row norms
    momentum: int  # the momenta among the optimiser state (a checkpoint clones them)
    micro_batch: int
    chunk_tokens: int
    accumulates: bool  # train.grad_accum > 1: gradients live through the forward

    @property
    def train_peak(self) -> int:
        """At the start of a micro-batch's backward: state, saved activations, the head's buffers.
        Under accumulation the gradients of the earlier micro-batches are there too; otherwise
        they appear only as the backward frees the activations (the step's peak covers them)."""
        held = self.gradients if self.accumulates else 0
        return self.weights + held + self.optimizer + self.activations + self.logits

    @property
    def step_peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.optimizer_workspace

    @property
    def eval_peak(self) -> int:
        return self.weights + self.optimizer + self.eval_working

    @property
    def resting_peak(self) -> int:
        """Between steps (gradients freed), with the exact certificate's float64 copies."""
        return self.weights + self.optimizer + self.certificate_workspace

    @property
    def checkpoint_peak(self) -> int:
        """Saving a checkpoint: the momenta are cloned into it (Adam's moments are not)."""
        return self.weights + self.optimizer + self.momentum

    @property
    def export_peak(self) -> int:
        """Exporting: safetensors writes the weights as they are."""
        return self.weights + self.optimizer

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.step_peak, self.eval_peak, self.resting_peak, self.checkpoint_peak,
                   self.export_peak)

    def table(self) -> dict[str, float]:
        """GiB by term and phase, for logs and benchmarks."""
        names = ("weights", "gradients", "optimizer", "activations", "logits", "optimizer_workspace", "eval_working",
                 "certificate_workspace")
        out = {n: getattr(self, n) / GIB for n in names}
        out.update(train_peak=self.train_peak / GIB, step_peak=self.step_peak / GIB, eval_peak=self.eval_peak / GIB,
                   resting_peak=self.resting_peak / GIB, checkpoint_peak=self.checkpoint_peak / GIB,
                   export_peak=self.export_peak / GIB, peak=self.peak / GIB)
        return out


def estimate_memory(cfg: Config, world_size: int = 1, rank: int | None = None,
                    micro_batch: int | None = None) -> MemoryEstimate:
    """Predicted memory of `rank` (default: the rank that owns the most) for `cfg` on
    `world_size` ranks; `micro_batch` overrides the config's sequences per micro-step.
    `cfg.model.vocab_size` must be known (not 0)."""
    m, t = cfg.model, cfg.train
    if m.vocab_size <= 0:
        raise ValueError("estimate_memory needs model.vocab_size (take it from the tokenizer first)")
    shapes = param_shapes(m)
    numel = {n: a * b for n, (a, b) in shapes.items()}
    f4 = FLOAT32_BYTES
    deepspeed = world_size > 1 and cfg.optim.name == "muon" and cfg.optim.embed == "adam"
    stage = cfg.dist.zero_stage if deepspeed else 0
    embed = numel["embed.weight"]
    ours = [n for n in shapes if n != "embed.weight" or not deepspeed]
    plan = plan_ownership({n: numel[n] for n in ours}, world_size)
    loads = plan.loads({n: numel[n] for n in ours})
    rank = max(range(world_size), key=lambda r: loads[r]) if rank is None else rank
    owned = plan.owned_by(rank)
    matrices = sum(v for n, v in numel.items() if n != "embed.weight")

    weights = f4 * (matrices + (embed // world_size if stage == 3 else embed))
    gradients = f4 * (matrices + (embed // world_size if stage >= 2 else embed))
    momentum = 0
    if cfg.optim.name == "adamw":
        optimizer = 2 * f4 * (matrices + embed)
    else:
        momentum = f4 * sum(numel[n] for n in owned if n != "embed.weight")
        optimizer = momentum
        if deepspeed:  # Adam's two moments, plus DeepSpeed's float32 master partition at ZeRO ≥ 1
            optimizer += (2 * f4 * embed if stage == 0 else 3 * f4 * embed // world_size)
        elif "embed.weight" in owned and cfg.optim.embed == "adam":
            optimizer += 2 * f4 * embed
        elif "embed.weight" in owned:
            momentum += f4 * embed
            optimizer += f4 * embed

    micro = micro_batch_size(cfg, world_size) if micro_batch is None else micro_batch
    seq = cfg.seq_len()
    tokens = micro * seq
    d, vocab, vp = m.d_model, m.vocab_size, padded_vocab(m)
    half = t.dtype == "bfloat16"
    # The document mask. SDPA: one bool (B, 1, T, T) and per layer the additive copy it saves
    # (evaluation keeps about one layer's share); FlexAttention: the block mask every layer reads.
    if not cfg.data.document_mask:
        mask_bytes = eval_mask = 0
    elif t.attention == "flex":
        mask_bytes = eval_mask = block_mask_bytes(micro, seq)
    else:
        mask_bytes = micro * seq * seq * (1 + m.n_layers * (2 if half else f4))
        eval_mask = mask_bytes // max(m.n_layers, 1)
    activations = (m.n_layers * tokens * activation_bytes_per_token_layer(m, t.dtype)
                   + tokens * (8 + f4 * d)  # token ids (int64), the embedding's output
                   + mask_bytes
                   + (2 * matrices if half else 0))  # autocast's bf16 copies of the matrices
    chunk = min(chunk_tokens(t.logits_chunk_mib, vocab), tokens)
    head_grad = f4 * vp * d
    # bf16: the head's bf16 copy, and each chunk's head gradient in bf16 and float32 before it is added
    half_copies = (2 * vp + 6 * vocab) * d if half else 0
    logits = LOGIT_BUFFERS * f4 * chunk * vocab + f4 * tokens * d + head_grad + half_copies
    groups: dict[tuple, int] = {}
    for n in owned:
        if n != "embed.weight":
            groups[shapes[n]] = groups.get(shapes[n], 0) + numel[n]
    optimizer_workspace = NS_BUFFERS * f4 * max(groups.values(), default=0)
    # Evaluation keeps no graph: a few (B, T, r·d) tensors of one block at a time.
    eval_working = (tokens * (8 + f4 * (3 + 2 * m.mlp_ratio) * d) + eval_mask
                    + LOGIT_BUFFERS * f4 * chunk * vocab + (2 * (matrices + vp * d) if half else 0))
    # float64: a matrix and its SVD's working copy; the embedding squared for its row norms
    certificate_workspace = 2 * 8 * max(max(numel[n] for n in shapes if n != "embed.weight"), embed)
    return MemoryEstimate(weights, gradients, optimizer, activations, logits, optimizer_workspace, eval_working,
                          certificate_workspace, momentum, micro, chunk, t.grad_accum > 1)


def largest_fitting_micro_batch(cfg: Config, world_size: int, limit_bytes: float) -> int:
    """The most sequences per micro-step whose predicted peak fits `limit_bytes` (0: none fits)."""
    lo, hi = 0, 1
    while estimate_memory(cfg, world_size, micro_batch=hi).peak <= limit_bytes and hi < 2**20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate_memory(cfg, world_size, micro_batch=mid).peak <= limit_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def memory_limit_gib(cfg: Config, device: torch.device) -> float | None:
    """The limit in force: train.max_memory_gib, or the GPU's memory when it is 0 (no limit on CPU)."""
    limit = cfg.train.max_memory_gib
    if limit < 0 or (limit == 0 and device.type != "cuda"):
        return None
    if limit == 0:
        return torch.cuda.get_device_properties(device).total_memory / GIB
    return limit


def check_memory(cfg: Config, world_size: int, device: torch.device) -> MemoryEstimate | None:
    """Refuse, before any process group starts, a micro-batch whose predicted peak exceeds the
    limit; the message names the largest micro-batch that fits and how to get it."""
    limit = memory_limit_gib(cfg, device)
    if limit is None:
        return None
    est = estimate_memory(cfg, world_size)
    if est.peak <= limit * GIB:
        return est
    fits = largest_fitting_micro_batch(cfg, world_size, limit * GIB)
    t = cfg.train
    if fits == 0:
        fix = ("not even one sequence fits: shorten data.seq_len, lower train.logits_chunk_mib, or use more "
               "ranks / a larger ZeRO stage")
    else:
        accum = -(-t.batch_size // (world_size * fits))
        while t.batch_size % (world_size * accum):
            accum += 1
        fix = (f"the largest micro-batch that fits is {fits} sequences: set train.grad_accum={accum} "
               f"({t.batch_size // (world_size * accum)} per micro-step)")
    raise ConfigError(f"predicted peak memory {est.peak / GIB:.3g} GiB per rank (micro-batch {est.micro_batch} × "
                      f"{cfg.seq_len()} tokens) exceeds train.max_memory_gib={limit:g}; {fix}")

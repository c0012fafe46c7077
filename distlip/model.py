"""The Lipschitz transformer (docs/method.md#architecture): no norms, no biases, convex residuals, 1/d attention.

Every hidden layer is a bias-free `nn.Linear` whose weight (d_out, d_in) the constraint keeps
under its RMS→RMS cap; the token embedding's rows are capped to RMS ≤ 1. Shapes: token ids
(B, T) int64 → logits (B, T, vocab_size) in float32.

Attention masks: None (causal), a dense boolean (B, 1, T, T) mask (True: may attend; SDPA), or a
FlexAttention `BlockMask` (FlexAttention). `document_mask(ids)` turns per-token document ids
(B, T) into the one the chosen kernel reads. `set_fast_path` picks kernels without changing the
function (docs/memory.md#fast-path): FlexAttention for document masks, compiled blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from distlip.config.schema import ModelConfig
from distlip.data.packing import dense_document_mask

# max_x d/dx GELU(x) = Φ(√2) + √2·φ(√2) for the exact (erf) GELU: dividing by it makes the
# activation 1-Lipschitz. Computed, not typed in, so it is exact to float precision.
GELU_MAX_SLOPE = 0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi)
ATTN_OUT_SCALE = 1.0 / 3.0  # makes functional attention 1-Lipschitz for unit-RMS inputs
FLEX_TILE = 128  # FlexAttention's default tile: its block mask marks (query, key) tiles of this many tokens


def padded_vocab(cfg: ModelConfig) -> int:
    """Head rows: vocab_size rounded up to a multiple of `pad_vocab_to` (fast GPU matmuls)."""
    return -(-cfg.vocab_size // cfg.pad_vocab_to) * cfg.pad_vocab_to


class Rotary(nn.Module):
    """Rotary position embedding on the first `rot` dimensions of each head (an isometry per
    position, so it does not change the Lipschitz bound). Input/output (B, H, T, d_head)."""

    def __init__(self, d_head: int, fraction: float, base: float, context: int):
        super().__init__()
        self.rot = int(d_head * fraction)
        freqs = base ** (-torch.arange(0, self.rot, 2, dtype=torch.float32) / max(self.rot, 1))
        angles = torch.outer(torch.arange(context, dtype=torch.float32), freqs)  # (T, rot/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rot == 0:
            return x
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2, rest = x[..., : self.rot // 2], x[..., self.rot // 2: self.rot], x[..., self.rot:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), dim=-1)


class Attention(nn.Module):
    """(1/3)·W_o·softmax(s·QKᵀ/d_head + B + causal mask)·V with rotary q, k and the positional
    bias B of `positional_bias` (zero unless `model.lookback` is set). (B, T, d) → (B, T, d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.d_head = cfg.n_heads, d // cfg.n_heads
        self.scale = cfg.attn_scale / self.d_head  # 1/d_head, not 1/√d_head
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.rotary = Rotary(self.d_head, cfg.rotary_fraction, cfg.rotary_base, cfg.context)
        back = list(cfg.lookback) + [0] * (self.n_heads - len(cfg.lookback))
        self.register_buffer("lookback", torch.tensor(back) if any(back) else None, persistent=False)
        self.lookback_bias = cfg.lookback_bias

    def positional_bias(self, T: int, dtype: torch.dtype) -> torch.Tensor:
        """(H, T, T) additive scores: `lookback_bias` where key j = query i − lookback[h] (heads
        with lookback 0 get none; (1, T, T) zeros without `model.lookback`), −∞ above the diagonal
        (causal). It does not depend on the input."""
        i = torch.arange(T, device=self.q.weight.device)
        offset = i[:, None] - i[None, :]
        if self.lookback is None:
            bias = torch.zeros(1, T, T, dtype=dtype, device=i.device)
        else:
            hit = (offset == self.lookback[:, None, None]) & (self.lookback[:, None, None] > 0)
            bias = torch.where(hit, self.lookback_bias, 0.0).to(dtype)
        return bias.masked_fill(offset < 0, -math.inf)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d) → q, k, v (B, H, T, d_head), q and k rotated."""
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # noqa: E731
        return self.rotary(split(self.q(x))), self.rotary(split(self.k(x))), split(self.v(x))

    def content_scores(self, x: torch.Tensor) -> torch.Tensor:
        """s·q·kᵀ/d_head (B, H, T, T) before any bias or mask: the part of the scores that depends on
        the input (for inspection; `forward` computes the same inside SDPA)."""
        q, k, _ = self.heads(x)
        return self.scale * q @ k.transpose(-1, -2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.heads(x)
        if self.lookback is not None:  # checks.validate keeps FlexAttention's block masks away
            bias = self.positional_bias(T, q.dtype)
            if attn_mask is not None:
                bias = bias.masked_fill(~attn_mask, -math.inf)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        elif isinstance(attn_mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=attn_mask, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                               scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(B, T, d) * ATTN_OUT_SCALE)


class MLP(nn.Module):
    """W_out·(GELU(W_in x)/GELU_MAX_SLOPE), hidden mlp_ratio·d. (B, T, d) → (B, T, d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.fc_in = nn.Linear(d, cfg.mlp_ratio * d, bias=False)
        self.fc_out = nn.Linear(cfg.mlp_ratio * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)) / GELU_MAX_SLOPE)


class Block(nn.Module):
    """Two convex residuals: x ← (1−α)x + α·attn(x); x ← (1−α)x + α·mlp(x). In training mode each
    branch's output passes through dropout (`model.dropout`); in eval mode, the certified map, not."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.alpha = 1.0 / (2 * cfg.n_layers)
        self.dropout = cfg.dropout
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        a = self.alpha
        # Under bf16 autocast the branches return bf16; the residual stream stays in its own
        # dtype (lerp refuses mixed dtypes, and a float32 stream keeps the small α-steps exact).
        x = torch.lerp(x, self.drop(self.attn(x, attn_mask)).to(x.dtype), a)
        return torch.lerp(x, self.drop(self.mlp(x)).to(x.dtype), a)

    def drop(self, y: torch.Tensor) -> torch.Tensor:
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class LipschitzTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.attention = "sdpa"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, padded_vocab(cfg), bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Hidden matrices orth(randn)·√(d_out/d_in) (RMS→RMS norm 1); output projections and
        head zero; token vectors RMS 1. Uses the global RNG: seed it before building."""
        for name, p in self.named_parameters():
            if name == "embed.weight":
                p.normal_()
                p.div_(p.pow(2).mean(dim=1, keepdim=True).sqrt())
            elif is_output_projection(name):
                p.zero_()
            else:
                nn.init.orthogonal_(p)
                p.mul_(math.sqrt(p.shape[0] / p.shape[1]))

    def set_fast_path(self, attention: str = "sdpa", compile: bool = False) -> None:
        """Kernels, not the function. `attention="flex"`: `document_mask` gives FlexAttention block
        masks, made from the document ids without any T × T tensor, so document-masked attention
        skips the tiles with nothing to attend (causal attention stays on SDPA's causal kernel; a
        dense mask passed in still runs through SDPA). `compile`: each block through
        `torch.compile` (parameter names and state dicts unchanged); FlexAttention runs as a fused
        kernel only inside compiled code, eager it holds the scores."""
        self.attention = attention
        if compile:
            for block in self.blocks:
                block.compile()

    def document_mask(self, ids: torch.Tensor) -> torch.Tensor | BlockMask:
        """Document-causal attention for per-token document ids `ids` (B, T) int
        (`data.packing.document_ids`): query i attends to key j ≤ i where the ids are equal. Under
        `attention="sdpa"` a dense boolean (B, 1, T, T) mask; under `"flex"` a `BlockMask` of
        B·⌈T/128⌉² tile entries that reads `ids` (`document_block_mask`)."""
        return document_block_mask(ids) if self.attention == "flex" else dense_document_mask(ids)

    def hidden(self, h: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        """Embeddings (B, T, d) → final residual stream (B, T, d)."""
        for block in self.blocks:
            h = block(h, attn_mask)
        return h

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final residual stream (..., d) → logits (..., vocab_size), float32. For many tokens at
        once, `distlip.loss` computes the loss without holding all their logits."""
        return (self.head(x) * self.cfg.logit_scale)[..., : self.cfg.vocab_size].float()

    def logits_from_embeddings(self, h: torch.Tensor,
                               attn_mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        """Embeddings (B, T, d) → logits (B, T, vocab_size), float32. The certified map."""
        return self.head_logits(self.hidden(h, attn_mask))

    def forward(self, idx: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        return self.logits_from_embeddings(self.embed(idx), attn_mask)


def document_block_mask(ids: torch.Tensor, tile: int = FLEX_TILE) -> BlockMask:
    """FlexAttention's block mask for document-causal attention over document ids `ids` (B, T),
    non-decreasing along each row (`data.packing.document_ids`): query q attends to key kv where
    `ids[b, q] == ids[b, kv]` and kv ≤ q.

    Made from each tile's first and last id in O(B·(T/tile)²) memory, never a T × T tensor (torch's
    `create_block_mask` evaluates the mask at every (q, kv) pair). A key tile j before query tile i
    precedes it entirely, so with non-decreasing ids some pair shares a document iff j's last id
    is i's first, and every pair does iff j's first id is i's last: then the tile is full (read
    without the mask) unless i runs past T; the diagonal tile is partial (full for one-token
    tiles); later tiles are skipped. The same tiles as `create_block_mask` gives.
    """
    B, T = ids.shape
    start = torch.arange(0, T, tile, device=ids.device)
    end = (start + tile).clamp(max=T) - 1
    first, last = ids[:, start], ids[:, end]  # (B, n): each tile's ids span [first, last]
    before = start[None, :] < start[:, None]  # (query tile, key tile)
    touches = ((last[:, None, :] == first[:, :, None]) & before) | torch.eye(len(start), dtype=torch.bool,
                                                                              device=ids.device)
    whole_query = (end - start + 1 == tile)[:, None]  # create_block_mask pads T to tiles: never full past T
    full = (first[:, None, :] == last[:, :, None]) & (end[None, :] <= start[:, None]) & whole_query

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, n) bool → per query tile its count (B, 1, n) and its key tiles listed first (B, 1, n, n), int32."""
        tiles = tiles[:, None].to(torch.int32)
        return (tiles.sum(-1, dtype=torch.int32),
                torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32))

    def same_document(b, h, q, kv):
        return (ids[b, q] == ids[b, kv]) & (kv <= q)

    return BlockMask.from_kv_blocks(*ordered(touches & ~full), *ordered(full), BLOCK_SIZE=tile,
                                    mask_mod=same_document, seq_lengths=(T, T))


def is_output_projection(name: str) -> bool:
    """Zero-initialised matrices: attention W_o, MLP W_out and the head."""
    return name.endswith(("attn.o.weight", "mlp.fc_out.weight")) or name == "head.weight"


def param_group(name: str) -> str:
    """Learning-rate group of a parameter: embed, head, qkv, out or mlp (docs/method.md#muon)."""
    if name == "embed.weight":
        return "embed"
    if name == "head.weight":
        return "head"
    if name.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight")):
        return "qkv"
    if name.endswith("attn.o.weight"):
        return "out"
    if ".mlp." in name:
        return "mlp"
    raise KeyError(f"parameter {name} belongs to no learning-rate group")


def matrix_names(model: nn.Module) -> list[str]:
    """Every constrained matrix (all weights but the embedding), in model order."""
    return [n for n, p in model.named_parameters() if n != "embed.weight"]


def attention_flops_per_token(cfg: ModelConfig) -> float:
    """Forward+backward FLOPs per token for QKᵀ and AV (causal: half the T×T entries)."""
    return 6 * cfg.n_layers * cfg.d_model * cfg.context


def head_blocks(name: str, n_heads: int) -> int:
    """Row blocks a matrix splits into, one per attention head: n_heads for W_q, W_k, W_v (rows
    h·d_head … (h+1)·d_head − 1 make head h's query, key or value), 1 for every other matrix."""
    return n_heads if name.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight")) else 1


def block_key(name: str, h: int) -> str:
    """Name of head h's row block of matrix `name` (norm tables, power-iteration vectors)."""
    return f"{name}[{h}]"


def matrix_of(key: str) -> str:
    """The matrix a norm-table key belongs to: `block_key(name, h)` → name; a name → itself."""
    return key.split("[", 1)[0]

"""Cross-entropy and top-1 accuracy over a large vocabulary, a chunk of tokens at a time.

The head's logits for N tokens are N × V floats: 64 windows × 1024 tokens × 50,304 words are
13 GB in float32, before the loss's own temporaries. Here only `chunk` tokens' logits exist at
once (two float32 buffers of `chunk × V` at the peak), so memory is set by the chunk, not by how
many tokens are evaluated or trained on.

Training uses a fused head + loss (`head_cross_entropy`): each chunk's logits are made, turned
into the loss and into the gradients of the hidden states and of the head, and dropped, all in
the forward pass; backward only scales the stored gradients. Losses and gradients equal those
of `F.cross_entropy(head(h)·scale)` up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT32_BYTES = 4
LOGIT_BUFFERS = 2  # float32 chunk × V buffers alive at once: logits and their log-softmax


def chunk_tokens(budget_mib: float, vocab: int) -> int:
    """Tokens per chunk whose float32 logits (`tokens × vocab × 4` bytes) fit `budget_mib` MiB."""
    return max(1, int(budget_mib * 2**20) // (FLOAT32_BYTES * vocab))


def compute_dtype(device: torch.device) -> torch.dtype:
    """The matmul dtype autocast uses on `device` now (float32 outside autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, scale: float, vocab: int) -> torch.Tensor:
    """(n, d) hidden states and (V_padded, d) head, both in the compute dtype → (n, vocab)
    float32 logits, rounded as the unchunked head rounds them (`linear`, `× scale` in the
    compute dtype, `float()`). Only the first `vocab` rows of the head are used: the output is
    contiguous, scaled in place, and one float32 buffer in float32."""
    return F.linear(h, w[:vocab]).mul_(scale).float()


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `(h Wᵀ)·scale` (first `vocab` columns) against the target
    distribution (1 − α)·onehot(targets) + α·soft (α = 0 without `soft`); both gradients are
    computed chunk by chunk in the forward pass, for an upstream gradient of 1."""

    @staticmethod
    def forward(ctx, h, weight, targets, scale, vocab, chunk, dtype, soft, alpha):
        n = h.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hard = 1.0 - alpha if soft is not None else 1.0
        w = weight.to(dtype)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, n, chunk):
                hc, yc = h[i:i + chunk].to(dtype), targets[i:i + chunk]
                logp = torch.log_softmax(_chunk_logits(hc, w, scale, vocab), dim=-1)
                total += hard * F.nll_loss(logp, yc, reduction="sum").double()
                if soft is not None:
                    qc = soft[i:i + chunk].float()
                    total -= alpha * (qc * logp).sum().double()
                if not (want_h or want_w):
                    continue
                # d(mean loss)/d(logits) = (softmax − target distribution)/n, made in the log-probs' memory
                dlogits = logp.exp_()
                dlogits[torch.arange(len(yc), device=h.device), yc] -= hard
                if soft is not None:
                    dlogits.sub_(qc, alpha=alpha)
                dz = dlogits.mul_(scale / n).to(dtype)
                del logp, dlogits
                if want_h:
                    grad_h[i:i + chunk] = (dz @ w[:vocab]).to(h.dtype)
                if want_w and dtype == grad_w.dtype:
                    grad_w[:vocab].addmm_(dz.t(), hc)  # in place: no head-sized temporary per chunk
                elif want_w:
                    grad_w[:vocab] += (dz.t() @ hc).to(grad_w.dtype)
        ctx.grads = (grad_h, grad_w)
        return (total / n).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # the returned tensors are then the only references: autograd keeps them as they are
        for g in (grad_h, grad_w):
            if g is not None:
                g.mul_(grad_out.to(g.dtype))
        return grad_h, grad_w, None, None, None, None, None, None, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float, vocab: int,
                       chunk: int, soft: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """Mean next-token loss (scalar, float32) of the head `weight` (V_padded, d) applied to
    hidden states `h` (..., d), logits `× scale`, first `vocab` columns, against `targets` (...)
    int64; `chunk` tokens at a time. Under autocast the matmuls run in its dtype.

    With `soft` (..., vocab) probabilities (a teacher's, `distlip.teacher`) the target is the
    mixture (1 − α)·onehot(targets) + α·soft: the loss is (1 − α)·CE(targets) + α·CE(soft)."""
    dtype = compute_dtype(h.device)
    if soft is not None:
        soft = soft.reshape(-1, soft.shape[-1])
    return _HeadCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), scale, vocab,
                                   chunk, dtype, soft, alpha)


@torch.no_grad()
def head_loss_and_correct(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float, vocab: int,
                          chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss (float64) and number of top-1 hits (int64) of the head over hidden
    states `h` (..., d) against `targets` (...), `chunk` tokens at a time (evaluation)."""
    dtype = compute_dtype(h.device)
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    w = weight.to(dtype)
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    correct = torch.zeros((), dtype=torch.int64, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for i in range(0, h.shape[0], chunk):
            yc = targets[i:i + chunk]
            logits = _chunk_logits(h[i:i + chunk].to(dtype), w, scale, vocab)
            correct += (logits.argmax(-1) == yc).sum()
            loss += F.nll_loss(torch.log_softmax(logits, dim=-1), yc, reduction="sum").double()
    return loss, correct

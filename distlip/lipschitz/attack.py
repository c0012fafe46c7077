"""Attacks on a Lipschitz certificate: searches for large output/input distance ratios.

The norm is the certificate's: for a sequence of token vectors (T, d), the largest per-token
RMS over the T tokens (`max_rms`). Every number returned here is a ratio actually achieved by
the function (a pair of inputs, or a Jacobian at a point applied to a direction), so it is a
LOWER bound on the true Lipschitz constant: a certificate below it would be wrong.

`f` maps a batch of sequences (B, T, d) to (B, T, V) (e.g. embeddings → logits). Only reverse
mode is used to differentiate it (scaled-dot-product attention has no forward-mode derivative
on CPU); forward directions come from central differences and only steer the search, never the
reported value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Fn = Callable[[Tensor], Tensor]


def max_rms(x: Tensor) -> Tensor:
    """(..., T, d) → (...): the largest per-token RMS over the T tokens (the certificate's norm)."""
    return x.pow(2).mean(dim=-1).sqrt().amax(dim=-1)


def token_rms(x: Tensor) -> Tensor:
    """(..., T, d) → (..., T, 1): per-token RMS."""
    return x.pow(2).mean(dim=-1, keepdim=True).sqrt()


def clip_to_ball(delta: Tensor, radius: float) -> Tensor:
    """Projection onto the max-RMS ball of `radius`: the ball is a product of per-token balls,
    so each token vector is scaled down to RMS ≤ radius on its own."""
    return delta / (token_rms(delta) / radius).clamp_min(1.0)


def _random_tokens(x: Tensor, scale: Tensor | float, gen: torch.Generator) -> Tensor:
    """Random (B, T, d) directions with per-token RMS exactly `scale`."""
    z = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
    return z / token_rms(z).clamp_min(torch.finfo(x.dtype).tiny) * scale


def pair_attack(f: Fn, x: Tensor, radius: float, *, steps: int = 50, restarts: int = 4, seed: int = 0) -> float:
    """Largest `max_rms(f(a) − f(b)) / max_rms(a − b)` found by projected gradient ascent on
    pairs a, b with `max_rms(a − x) ≤ radius` and `max_rms(b − x) ≤ radius`.

    `f`: (B, T, d) → (B, T, V); `x`: (B, T, d), every batch row attacked separately. Restarts
    alternate between far pairs (both ends anywhere in the ball) and near pairs (b a small
    step from a, which probe the local Jacobian). The ascent step is steepest ascent for this
    norm: each token's gradient normalised to RMS 1. Returns a lower bound on the Lipschitz
    constant of `f` on the ball (a ratio some pair achieves), as a float.
    """
    if radius <= 0:
        raise ValueError(f"pair_attack: radius must be > 0, got {radius}")
    gen = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(x.dtype).tiny
    x = x.detach()
    best = 0.0

    def ratio(da: Tensor, db: Tensor) -> Tensor:
        num = max_rms(f(x + da) - f(x + db))
        return num / max_rms(da - db).clamp_min(tiny)

    for r in range(restarts):
        scale = radius * torch.rand(x.shape[:-1] + (1,), generator=gen, dtype=torch.float64).to(x)
        da = _random_tokens(x, scale, gen)
        if r % 2 == 0:
            db = _random_tokens(x, scale.flip(-2), gen)
        else:  # near pair: separation a few percent of the radius
            db = clip_to_ball(da + _random_tokens(x, 0.05 * radius, gen), radius)
        for s in range(steps):
            da.requires_grad_(True)
            db.requires_grad_(True)
            value = ratio(da, db)
            best = max(best, value.max().item())
            ga, gb = torch.autograd.grad(value.sum(), (da, db))
            eta = radius * 0.25 * (1.0 - s / steps) ** 2 + radius * 1e-3
            with torch.no_grad():
                # near pairs keep a smaller step on the separation so they stay near pairs
                sep = 1.0 if r % 2 == 0 else 0.1
                da = clip_to_ball(da + eta * ga / token_rms(ga).clamp_min(tiny), radius)
                db = clip_to_ball(db + sep * eta * gb / token_rms(gb).clamp_min(tiny), radius)
        with torch.no_grad():
            best = max(best, ratio(da, db).max().item())
    return best


def jacobian_attack(f: Fn, x: Tensor, *, iters: int = 30, seed: int = 0) -> float:
    """Largest lower bound found on the operator norm of the Jacobian J of `f` at `x`, from
    max-over-tokens RMS (inputs) to max-over-tokens RMS (outputs); `f`: (B, T, d) → (B, T, V),
    `x`: (B, T, d), each batch row on its own.

    Block power iteration for this norm. For an output token t and a direction g ∈ ℝ^V, the
    best input direction gives each input token j the direction of the block (J_tᵀ g)_j at RMS 1,
    and then ‖J‖ ≥ √(d/V)·Σ_j ‖(J_tᵀ g)_j‖ / ‖g‖, computed exactly by reverse mode: that is the
    value reported. The next (t, g) come from y = J u (central differences): t is the token with
    the largest RMS of y, g = y_t. A Jacobian norm at a point is a lower bound on the Lipschitz
    constant near it. Returns a float.
    """
    gen = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(x.dtype).tiny
    x = x.detach()
    B, T, d = x.shape
    with torch.no_grad():
        y0 = f(x)
    V = y0.shape[-1]
    h = 1e-3 * max(1.0, max_rms(x).max().item())
    rows = torch.arange(B, device=x.device)

    def jt_g(t: Tensor, g: Tensor) -> Tensor:
        """J_tᵀ g for each batch row: t (B,) output tokens, g (B, V) → (B, T, d)."""
        xr = x.clone().requires_grad_(True)
        out = f(xr)
        seed_grad = torch.zeros_like(out)
        seed_grad[rows, t] = g.to(out.dtype)
        (grad,) = torch.autograd.grad(out, xr, seed_grad)
        return grad

    # start: a random input direction
    u = _random_tokens(x, 1.0, gen)
    best = 0.0
    for _ in range(iters):
        with torch.no_grad():
            y = (f(x + h * u) - f(x - h * u)) / (2 * h)  # ≈ J u, (B, T, V)
        t = token_rms(y).squeeze(-1).argmax(dim=-1)
        g = y[rows, t]
        g = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(tiny)
        w = jt_g(t, g)  # (B, T, d)
        norms = torch.linalg.vector_norm(w, dim=-1)  # (B, T)
        value = (d / V) ** 0.5 * norms.sum(dim=-1)
        best = max(best, value.max().item())
        keep = norms[..., None] > 0  # tokens that do not reach t keep their direction
        u = torch.where(keep, w / token_rms(w).clamp_min(tiny), u)
    return best


def token_pair_attack(f: Fn, tokens: Tensor, vocab: int, *, steps: int = 50, restarts: int = 4,
                      seed: int = 0) -> float:
    """Largest `max_rms(f(a) − f(b)) / max_t ‖a_t − b_t‖₁` found over pairs of soft token
    sequences by gradient ascent: the attack on a certificate from token ids (one-hot inputs,
    ℓ1 per token, e.g. `lipschitz_bound` or an ensemble's bound).

    `f`: (B, T, V) → (B, T, V') maps sequences of probability vectors over the vocabulary (the
    convex hull of one-hot tokens, where such a certificate holds: embedding a probability
    vector mixes embedding rows) to logits; `tokens`: (B, T) ids the pairs start from, `vocab`:
    V. a and b are softmaxes of free logits; restarts alternate between far pairs (a at the
    tokens, b at other random tokens) and near pairs (b a small perturbation of a). Returns a
    ratio some pair achieves, a lower bound on the constant, as a float.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    tiny = torch.finfo(dtype).tiny
    one_hot = torch.nn.functional.one_hot(tokens, vocab).to(dtype)
    best = 0.0

    def ratio(za: Tensor, zb: Tensor) -> Tensor:
        a, b = za.softmax(-1), zb.softmax(-1)
        den = (a - b).abs().sum(-1).amax(-1)
        return max_rms(f(a) - f(b)) / den.clamp_min(tiny)

    for r in range(restarts):
        za = 4.0 * one_hot + torch.randn(one_hot.shape, generator=gen, dtype=dtype)
        if r % 2 == 0:
            other = torch.randint(vocab, tokens.shape, generator=gen)
            zb = 4.0 * torch.nn.functional.one_hot(other, vocab).to(dtype)
            zb = zb + torch.randn(one_hot.shape, generator=gen, dtype=dtype)
        else:
            zb = za + 0.1 * torch.randn(one_hot.shape, generator=gen, dtype=dtype)
        za, zb = za.to(tokens.device).requires_grad_(True), zb.to(tokens.device).requires_grad_(True)
        opt = torch.optim.Adam([za, zb], lr=0.3 if r % 2 == 0 else 0.03)
        for _ in range(steps):
            value = ratio(za, zb)
            best = max(best, value.max().item())
            opt.zero_grad()
            (-value.sum()).backward()
            opt.step()
        with torch.no_grad():
            best = max(best, ratio(za, zb).max().item())
    return best

"""Spectral norms in RMS→RMS units: exact (the oracle), power iteration (a warm-started estimate
from below) and a Gram-iteration upper bound (a guarantee). Shapes (..., d_out, d_in), batched."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distlip.seeds import stream_seed

# Gram-iteration squarings for the guaranteed σ₁ upper bound: the bound exceeds σ₁ by at most
# rank^(1/2^(GRAM_ITERS+1)), i.e. ≤ 1.3% for rank 3072, and far less when σ₁ stands out.
GRAM_ITERS = 9


def rms_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """√(d_out/d_in) for a weight of shape (..., d_out, d_in)."""
    return math.sqrt(shape[-2] / shape[-1])


def spectral_norm(W: Tensor) -> Tensor:
    """Exact σ₁ of W (..., m, n) in float64, shape (...,): the oracle for tests and certificates."""
    return torch.linalg.matrix_norm(W.detach().to(torch.float64), ord=2)


def rms_norm(W: Tensor) -> Tensor:
    """Exact RMS→RMS norm σ₁·√(d_in/d_out) of W (..., d_out, d_in), float64, shape (...,)."""
    return spectral_norm(W) / rms_scale(W.shape)


def unit(x: Tensor, fallback: Tensor | None = None) -> Tensor:
    """x / ‖x‖ along the last dim; where x is zero, ``fallback`` (or zero)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    unit = x / norm.clamp_min(torch.finfo(x.dtype).tiny)
    if fallback is None:
        return unit
    return torch.where(norm > 0, unit, fallback)


def start_vector(seed: int, key: str, n: int) -> Tensor:
    """A power-iteration start vector (n,) float32 on the CPU, drawn from (seed, key) with a
    private generator: the same on every replica, whatever the global RNG did."""
    return torch.randn(n, generator=torch.Generator().manual_seed(stream_seed(seed, key)), dtype=torch.float32)


def power_iteration(W: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Estimate the top singular triple of W (..., m, n) from a start vector v (..., n).

    Returns (sigma (...,), u (..., m), v (..., n)). sigma = ‖Wv‖ with unit v is a lower
    bound on σ₁. A zero matrix keeps its start direction (so a stored vector never
    collapses to zero) and gives sigma = 0, u = 0.
    """
    v = unit(v)
    for _ in range(iters):
        u = unit((W @ v.unsqueeze(-1)).squeeze(-1))
        v = unit((W.mT @ u.unsqueeze(-1)).squeeze(-1), fallback=v)
    Wv = (W @ v.unsqueeze(-1)).squeeze(-1)
    sigma = torch.linalg.vector_norm(Wv, dim=-1)
    return sigma, unit(Wv), v


def sigma_upper_bound(W: Tensor, iters: int = GRAM_ITERS) -> Tensor:
    """A guaranteed upper bound on σ₁ of W (..., m, n), shape (...,), by Gram iteration.

    With A₀ = WWᵀ (the smaller Gram matrix) and A_{k+1} = A_k², the eigenvalues of A_k are
    σᵢ^(2^(k+1)), so σ₁ ≤ ‖A_k‖_F^(1/2^(k+1)). Each A_k is renormalised (its log-scale kept)
    so nothing overflows; float64 keeps rounding far below the bound's own slack. Power
    iteration, by contrast, only ever approaches σ₁ from below.
    """
    X = W.double()
    A = X @ X.mT if X.size(-2) <= X.size(-1) else X.mT @ X
    log_scale = torch.zeros(A.shape[:-2], dtype=A.dtype, device=A.device)
    for _ in range(iters):
        f = torch.linalg.matrix_norm(A).clamp_min(1e-300)
        A = A / f[..., None, None]
        log_scale = 2 * (log_scale + f.log())
        A = A @ A
    log_fro = torch.linalg.matrix_norm(A).clamp_min(1e-300).log()
    bound = torch.exp((log_scale + log_fro) / 2 ** (iters + 1))
    return (bound * (1 + 4 * torch.finfo(W.dtype).eps)).to(W.dtype)  # rounding to W's dtype stays above

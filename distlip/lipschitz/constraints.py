"""Weight constraints applied to every matrix after every optimiser step (docs/method.md#constraints).

Units: a d_out×d_in matrix W is measured in the RMS→RMS operator norm
`‖W‖ = σ₁(W)·√(d_in/d_out)`. The `Constrainer` (`lipschitz/constrainer.py`) divides W by
`scale = √(d_out/d_in)`, applies a map P to `W̃ = W/scale` (where ‖W‖ = σ₁(W̃)), and writes
back `scale·P(W̃)`. The pure maps here act on W̃ directly; norms live in `lipschitz/spectral.py`.

Pure maps take batched float tensors (..., m, n). Per-matrix scalars (caps, estimates,
coefficients) are floats or tensors of shape (...,); vectors u (..., m) and v (..., n)
are unit left/right singular-vector estimates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distlip.errors import ConfigError
from distlip.lipschitz.newton_schulz import msign, odd_polynomial

# Hard cap: 4 quintic steps whose composite is ≈ min(1, σ) on [0, 3.53] (docs/method.md#constraints).
HARD_CAP_COEFFS: tuple[tuple[float, float, float], ...] = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)
# The composite's maximum on [0, 3.53] is 1.0108815 (at σ = 1.185 and σ = 3.505);
# rounded up so that running at working scale σmax/HARD_CAP_PEAK never exceeds σmax.
HARD_CAP_PEAK = 1.01089
# Largest σ₁/σmax the working-scale hard cap handles (3.53 / HARD_CAP_PEAK).
HARD_CAP_RANGE = 3.49
# Matrices whose σ₁ bound exceeds this multiple of σmax are scaled down to it before the
# hard cap, inside HARD_CAP_RANGE with room for the bound's own slack (≤ 1.3%).
_HARD_CAP_NORMALIZE_TO = 3.0

# Soft cap: the composite p₂∘p₁ stays ≤ σmax on [0, k] only while the update norm
# μ ≤ 0.3·σmax (exactly: while αk² ≤ 1/3, i.e. k ≤ 81/62·σmax).
SOFT_CAP_MAX_MU = 0.3

# ---------------------------------------------------------------- validation


def check_cap(value: float, key: str) -> float:
    """A cap must be a finite number > 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}; set a positive cap")
    return float(value)


# ---------------------------------------------------------------- pure maps on W̃


def _per_matrix(x: float | Tensor, W: Tensor) -> Tensor:
    """A float or (...,) tensor as shape (..., 1, 1) in W's dtype and device."""
    return torch.as_tensor(x, dtype=W.dtype, device=W.device)[..., None, None]


def _rank_one(coef: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """coef·u vᵀ per matrix: coef (...,), u (..., m), v (..., n) → (..., m, n)."""
    return coef[..., None, None] * (u.unsqueeze(-1) * v.unsqueeze(-2))


def weight_decay(W: Tensor, lam_eta: float) -> Tensor:
    """(1 − λη)·W."""
    return W * (1.0 - lam_eta)


def spectral_weight_decay(W: Tensor, lam: float, u: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """W − λ·σ₁u₁v₁ᵀ: shrinks only the top singular value, by the factor (1 − λ)."""
    return W - _rank_one(lam * torch.as_tensor(sigma, dtype=W.dtype, device=W.device), u, v)


def spectral_normalize(W: Tensor, sigma_max: float | Tensor, sigma_est: float | Tensor) -> Tensor:
    """W / max(1, σ̃/σmax); guaranteed ≤ σmax when σ̃ ≥ σ₁ (the Constrainer passes
    `sigma_upper_bound`)."""
    ratio = _per_matrix(sigma_est, W) / _per_matrix(sigma_max, W)
    return W / ratio.clamp_min(1.0)


def stiefel(W: Tensor, sigma_max: float | Tensor) -> Tensor:
    """σmax·msign(W): every non-zero singular value set to σmax."""
    return _per_matrix(sigma_max, W) * msign(W)


def spectral_hammer(
    W: Tensor, sigma_max: float | Tensor, u: Tensor, v: Tensor, sigma: Tensor
) -> Tensor:
    """W + (σmax − σ₁)u₁v₁ᵀ: sets the (estimated) top singular value to σmax, no guarantee."""
    coef = torch.as_tensor(sigma_max, dtype=W.dtype, device=W.device) - sigma
    return W + _rank_one(coef, u, v)


def soft_cap(W: Tensor, alpha: float | Tensor) -> Tensor:
    """p₂(p₁(W)) with p₁(x) = x − αx³, p₂(x) = x + αx³ (8m²n FLOPs for m ≤ n).

    On singular values: σ − 3α²σ⁵ + 3α³σ⁷ − α⁴σ⁹. α from :func:`soft_cap_alpha`.
    """
    a = _per_matrix(alpha, W)
    return odd_polynomial(W, ((1.0, -a, 0.0), (1.0, a, 0.0)))


def hard_cap(W: Tensor, sigma_max: float | Tensor, sigma_est: float | Tensor) -> Tensor:
    """≈ min(σ, σmax) on every singular value, guaranteed ≤ σmax for σ₁ ≤ 3.49·σmax.

    Runs the 4 quintic steps at working scale s = σmax/HARD_CAP_PEAK, so the polynomial's
    overshoot lands exactly on σmax; singular values below ≈0.95·σmax are kept to within
    5%, larger ones end between 0.95·σmax and σmax. A matrix whose estimate σ̃ exceeds
    3·σmax is first scaled down to σ̃ = 3·σmax to stay inside the polynomial's valid range.
    """
    cap = _per_matrix(sigma_max, W)
    est = _per_matrix(sigma_est, W)
    shrink = (_HARD_CAP_NORMALIZE_TO * cap / est).clamp(max=1.0)  # est = 0 gives inf → 1
    s = cap / HARD_CAP_PEAK
    return s * odd_polynomial(W * (shrink / s), HARD_CAP_COEFFS)


def exact_cap(W: Tensor, sigma_max: float | Tensor) -> Tensor:
    """U·min(Σ, σmax)·Vᵀ, exactly (float64): the reference (oracle) cap.

    Computed from the eigendecomposition of the Gram matrix on the smaller side, G = XᵀX with
    X = W or Wᵀ (n×n, n = min(d_out, d_in)): X·V·diag(min(1, σmax/σ))·Vᵀ with σ = √λ(G). A
    symmetric eigensolver always converges, where LAPACK's SVD can fail on the many equal singular
    values a capped matrix has, and it is about 3× faster than float64 SVD at the model's shapes.
    Squaring loses relative accuracy only on singular values far below σmax, and those are
    multiplied by 1 (V is orthogonal to float64 precision), so they come back unchanged.
    """
    cap = _per_matrix(sigma_max, W)[..., 0].double()
    wide = W.shape[-2] < W.shape[-1]
    X = W.double().mT if wide else W.double()
    lam, V = torch.linalg.eigh(X.mT @ X)
    sigma = lam.clamp(min=0).sqrt()
    scale = torch.where(sigma > cap, cap / sigma.clamp(min=torch.finfo(X.dtype).tiny), torch.ones_like(sigma))
    out = X @ (V * scale.unsqueeze(-2)) @ V.mT
    return (out.mT if wide else out).to(W.dtype)


def rounding_margin(dtype: torch.dtype) -> float:
    """Relative margin under the cap so the stored matrix stays ≤ σmax.

    Rounding W to bfloat16 or float16 raises σ₁ by up to about half of eps(dtype)
    (measured: 0.0023 for a 768×768 bfloat16 matrix with all σ at the cap, eps 0.0078);
    float32 iterations overshoot by ≈3e-7, covered by a 1e-5 floor.
    """
    return max(torch.finfo(dtype).eps, 1e-5)


def embed_cap(E: Tensor, max_rms: float = 1.0) -> Tensor:
    """Scale each row (token vector) of E (vocab, d) so its RMS is ≤ max_rms.

    Computed in float32, returned in E's dtype, with the rounding margin.
    """
    work = E.to(torch.promote_types(E.dtype, torch.float32))
    limit = max_rms * (1.0 - rounding_margin(E.dtype))
    rms = work.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return (work / (rms / limit).clamp_min(1.0)).to(E.dtype)


# ---------------------------------------------------------------- soft-cap coupling


def _soft_cap_gain(beta: float) -> float:
    """p₂(p₁(k))/k as a function of β = αk²: 1 − 3β² + 3β³ − β⁴, decreasing on β ≥ 0."""
    return 1.0 - 3.0 * beta**2 + 3.0 * beta**3 - beta**4


def soft_cap_alpha(sigma_max: float, mu: float, lam_eta: float = 0.0) -> float:
    """Soft-cap strength α with p₂(p₁(k)) = σmax for k = σmax(1 − λη) + μ.

    α is the smallest non-negative real root of `−k⁹α⁴ + 3k⁷α³ − 3k⁵α² + (k − σmax)`.
    Dividing by k and writing β = αk² gives gain(β) = σmax/k with gain decreasing from
    1 at β = 0, so the root is unique; it is found by bisection. Returns 0 when k ≤ σmax
    (nothing to cap). mu is the update's RMS→RMS norm bound.
    """
    sigma_max = check_cap(sigma_max, "sigma_max")
    if not (mu >= 0 and 0 <= lam_eta < 1):
        raise ConfigError(
            f"soft cap needs update norm >= 0 and 0 <= weight_decay·lr < 1, got {mu!r} and "
            f"{lam_eta!r}; check lr and weight_decay"
        )
    if mu > SOFT_CAP_MAX_MU * sigma_max:
        raise ConfigError(
            f"soft cap: update norm {mu:.4g} > {SOFT_CAP_MAX_MU}·sigma_max = "
            f"{SOFT_CAP_MAX_MU * sigma_max:.4g}, so the composite would overshoot the cap; "
            "lower lr or use method 'hard_cap' or 'spectral_normalize'"
        )
    k = sigma_max * (1.0 - lam_eta) + mu
    if k <= sigma_max:
        return 0.0
    target, lo, hi = sigma_max / k, 0.0, 1.0  # gain(0) = 1 > target > 0 = gain(1)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _soft_cap_gain(mid) > target else (lo, mid)
    return hi / k**2  # the upper end: composite at k is ≤ σmax, never above



"""Newton–Schulz iterations: Muon's orthogonalisation and an accurate matrix sign.

Every function here accepts batched matrices of shape (..., m, n) and applies odd
matrix polynomials ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ``. On singular values
that is the scalar map ``σ ← aσ + bσ³ + cσ⁵``; singular vectors are untouched.
The iteration always runs on the wide orientation (m ≤ n) so the Gram matrix A is
the smaller m×m one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

# Muon's five quintic steps (docs/method.md#muon). They map Frobenius-normalised singular values in
# [0.003, 1] into [0.977, 1.145] (smaller ones less far): an approximate orthogonalisation.
MUON_NS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Largest singular value orthogonalize() can output (max of the composite on [0, 1]).
NS_MAX_GAIN = 1.14502

# Cubic Newton–Schulz for the polar factor: σ ← 1.5σ − 0.5σ³ maps [0, √3] into [0, 1]
# and converges quadratically to 1 for every σ in (0, √3).
_CUBIC = (1.5, -0.5, 0.0)

Coeff = float | Tensor


def _is_tall(X: Tensor) -> bool:
    return X.size(-2) > X.size(-1)


def _odd_step(X: Tensor, a: Coeff, b: Coeff, c: Coeff) -> Tensor:
    """One step ``aX + (bA + cA²)X`` on a wide X (..., m, n), A = XXᵀ (..., m, m).

    a, b, c are floats or per-matrix tensors broadcastable to (..., 1, 1).
    """
    A = X @ X.mT
    B = b * A
    if not (isinstance(c, float) and c == 0.0):  # cubic steps skip the A² product
        B = B + c * (A @ A)
    return a * X + B @ X


def odd_polynomial(X: Tensor, coeffs: Iterable[Sequence[Coeff]]) -> Tensor:
    """Apply the steps ``(a, b, c)`` in order to X (..., m, n); returns (..., m, n).

    Runs in X's dtype on the wide orientation. Coefficients may be floats or
    per-matrix tensors of shape (..., 1, 1).
    """
    tall = _is_tall(X)
    if tall:
        X = X.mT
    for a, b, c in coeffs:
        X = _odd_step(X, a, b, c)
    return X.mT if tall else X


def _frobenius_normalize(X: Tensor, eps: float) -> Tensor:
    """X / (‖X‖_F + eps) per matrix, so every singular value lies in [0, 1)."""
    return X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)


def orthogonalize(G: Tensor, *, dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> Tensor:
    """Muon's orthogonalisation of G (..., m, n): 5 quintic Newton–Schulz steps.

    G is Frobenius-normalised per matrix, iterated in ``dtype`` (float32, or bfloat16
    for speed), and returned with G's shape and dtype. Singular values of at least
    0.3% of ‖G‖_F come out in [0.977, NS_MAX_GAIN]; zero ones stay zero.
    """
    X = _frobenius_normalize(G.to(dtype), eps)
    return odd_polynomial(X, MUON_NS_COEFFS).to(G.dtype)


def msign(X: Tensor, steps: int = 15, *, tol: float = 1e-4, eps: float = 1e-12) -> Tensor:
    """Accurate polar factor of X (..., m, n): every non-zero singular value → 1.

    Muon's quintic steps first lift small singular values quickly, then up to
    ``steps`` cubic Newton–Schulz steps converge quadratically; iteration stops once
    no matrix in the batch changes by more than ``tol`` in Frobenius norm (the next
    step would then move singular values by < 2·tol²). Zero singular values stay zero.
    Accurate for singular values above about 1e-4·‖X‖_F. Computed in float32 (float64
    inputs stay float64); returns X's shape and dtype.
    """
    work = torch.promote_types(X.dtype, torch.float32)
    Y = _frobenius_normalize(X.to(work), eps)
    tall = _is_tall(Y)
    if tall:
        Y = Y.mT
    for a, b, c in MUON_NS_COEFFS:
        Y = _odd_step(Y, a, b, c)
    for _ in range(steps):
        Y_next = _odd_step(Y, *_CUBIC)
        change = torch.linalg.matrix_norm(Y_next - Y).max()
        Y = Y_next
        if change.item() <= tol:
            break
    return (Y.mT if tall else Y).to(X.dtype)

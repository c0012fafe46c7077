"""Weight constraints applied to every matrix after every optimiser step (docs/method.md#constraints).

Units: a d_out×d_in matrix W is measured in the RMS→RMS operator norm
``‖W‖ = σ₁(W)·√(d_in/d_out)``. The :class:`Constrainer` divides W by
``scale = √(d_out/d_in)``, applies a map P to ``W̃ = W/scale`` (where ‖W‖ = σ₁(W̃)),
and writes back ``scale·P(W̃)``. The pure maps below act on W̃ directly.

Pure maps take batched float tensors (..., m, n). Per-matrix scalars (caps, estimates,
coefficients) are floats or tensors of shape (...,); vectors u (..., m) and v (..., n)
are unit left/right singular-vector estimates.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from distlip.errors import CheckpointError, ConfigError
from distlip.lipschitz.newton_schulz import msign, odd_polynomial
from distlip.model import block_key, matrix_of

METHODS = (
    "none",
    "weight_decay",
    "spectral_weight_decay",
    "spectral_normalize",
    "stiefel",
    "spectral_hammer",
    "soft_cap",
    "hard_cap",
    "exact_cap",
)

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

# Power-iteration steps for a vector's first use (later steps warm-start).
FIRST_USE_ITERS = 100

# Gram-iteration squarings for the guaranteed σ₁ upper bound: the bound exceeds σ₁ by at most
# rank^(1/2^(GRAM_ITERS+1)), i.e. ≤ 1.3% for rank 3072, and far less when σ₁ stands out.
GRAM_ITERS = 9

# ---------------------------------------------------------------- validation


def check_method(name: str) -> str:
    """Return ``name`` if it is one of METHODS, else raise ConfigError naming the closest."""
    if name in METHODS:
        return name
    closest = difflib.get_close_matches(str(name), METHODS, n=1, cutoff=0.0)
    raise ConfigError(
        f"unknown constraint method {name!r}; did you mean {closest[0]!r}? "
        f"(choose from {', '.join(METHODS)})"
    )


def _check_cap(value: float, key: str) -> float:
    """A cap must be a finite number > 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}; set a positive cap")
    return float(value)


# ---------------------------------------------------------------- norms


def rms_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """√(d_out/d_in) for a weight of shape (..., d_out, d_in)."""
    return math.sqrt(shape[-2] / shape[-1])


def spectral_norm(W: Tensor) -> Tensor:
    """Exact σ₁ of W (..., m, n) in float64, shape (...,): the oracle for tests and certificates."""
    return torch.linalg.matrix_norm(W.detach().to(torch.float64), ord=2)


def rms_norm(W: Tensor) -> Tensor:
    """Exact RMS→RMS norm σ₁·√(d_in/d_out) of W (..., d_out, d_in), float64, shape (...,)."""
    return spectral_norm(W) / rms_scale(W.shape)


def _unit(x: Tensor, fallback: Tensor | None = None) -> Tensor:
    """x / ‖x‖ along the last dim; where x is zero, ``fallback`` (or zero)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    unit = x / norm.clamp_min(torch.finfo(x.dtype).tiny)
    if fallback is None:
        return unit
    return torch.where(norm > 0, unit, fallback)


def power_iteration(W: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Estimate the top singular triple of W (..., m, n) from a start vector v (..., n).

    Returns (sigma (...,), u (..., m), v (..., n)). sigma = ‖Wv‖ with unit v is a lower
    bound on σ₁. A zero matrix keeps its start direction (so a stored vector never
    collapses to zero) and gives sigma = 0, u = 0.
    """
    v = _unit(v)
    for _ in range(iters):
        u = _unit((W @ v.unsqueeze(-1)).squeeze(-1))
        v = _unit((W.mT @ u.unsqueeze(-1)).squeeze(-1), fallback=v)
    Wv = (W @ v.unsqueeze(-1)).squeeze(-1)
    sigma = torch.linalg.vector_norm(Wv, dim=-1)
    return sigma, _unit(Wv), v


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
    """U·min(Σ, σmax)·Vᵀ by SVD: the reference (oracle) cap."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    S = torch.minimum(S, _per_matrix(sigma_max, W)[..., 0])
    return (U * S.unsqueeze(-2)) @ Vh


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

    α is the smallest non-negative real root of ``−k⁹α⁴ + 3k⁷α³ − 3k⁵α² + (k − σmax)``.
    Dividing by k and writing β = αk² gives gain(β) = σmax/k with gain decreasing from
    1 at β = 0, so the root is unique; it is found by bisection. Returns 0 when k ≤ σmax
    (nothing to cap). mu is the update's RMS→RMS norm bound.
    """
    sigma_max = _check_cap(sigma_max, "sigma_max")
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


# ---------------------------------------------------------------- stateful driver


def check_coefficients(method: str, weight_decay: float, spectral_wd: float, power_iters: int) -> None:
    """The method's coefficients: each method gets the ones it uses and no others (also checked in `config.checks.preflight`)."""
    if weight_decay < 0 or spectral_wd < 0 or power_iters < 1:
        raise ConfigError(
            "weight_decay and spectral_wd must be >= 0 and power_iters >= 1; fix the "
            "constraint settings"
        )
    if method == "weight_decay" and weight_decay == 0:
        raise ConfigError("method 'weight_decay' needs weight_decay > 0; set weight_decay")
    if method == "spectral_weight_decay" and spectral_wd == 0:
        raise ConfigError("method 'spectral_weight_decay' needs spectral_wd > 0; set spectral_wd")
    if method != "spectral_weight_decay" and spectral_wd > 0:
        raise ConfigError(
            f"spectral_wd is only used by method 'spectral_weight_decay', not {method!r}; "
            "remove it or change the method"
        )
    if method == "none" and weight_decay > 0:
        raise ConfigError("method 'none' applies no weight decay; use method 'weight_decay'")


class Constrainer:
    """Applies one constraint method to named matrices, step after step.

    Keeps one persistent power-iteration vector per parameter name, seeded from
    (seed, name) with a private generator, so every replica starts from the same vector,
    and warm-started each step (FIRST_USE_ITERS iterations on first use, then
    ``power_iters``). ``calls`` counts matrices handed to apply/apply_many.

    sigma_max is an RMS→RMS cap: a float for every matrix, or a mapping from parameter
    names or glob patterns (e.g. ``{"head.weight": 1.0, "*": 2.0}``) to caps; exact names
    win over patterns, patterns are tried in order.

    row_blocks maps a parameter name to a number of row blocks H (attention heads): such a
    (d_out, d_in) matrix is constrained as H matrices (d_out/H, d_in), each in its own RMS→RMS
    units √(d_in·H/d_out)·σ₁ and under the matrix's cap, so that every head's block is capped.
    Caps ≤ c on every block imply ‖W‖ ≤ c for the whole matrix (‖W‖² ≤ mean over blocks of
    their norms²). A block of an update whose norm is ≤ μ has norm ≤ √H·μ: the soft cap's
    coupling uses that bound per block, or, when it is beyond the coupling's range, the
    block's measured σ₁ bound (as without an update bound). Vectors and state are per block,
    keyed `name[h]`.
    """

    def __init__(
        self,
        method: str,
        sigma_max: float | Mapping[str, float],
        *,
        weight_decay: float = 0.0,
        spectral_wd: float = 0.0,
        power_iters: int = 3,
        seed: int = 0,
        row_blocks: Mapping[str, int] | None = None,
    ) -> None:
        self.method = check_method(method)
        self.row_blocks = {n: int(h) for n, h in (row_blocks or {}).items() if h > 1}
        if isinstance(sigma_max, Mapping):
            self._caps = {k: _check_cap(c, f"sigma_max[{k!r}]") for k, c in sigma_max.items()}
        else:
            self._caps = _check_cap(sigma_max, "sigma_max")
        check_coefficients(self.method, weight_decay, spectral_wd, power_iters)
        self.weight_decay = float(weight_decay)
        self.spectral_wd = float(spectral_wd)
        self.power_iters = int(power_iters)
        self.seed = int(seed)
        self.calls = 0
        self._vectors: dict[str, Tensor] = {}
        self._warned_fallback = False

    # ------------------------------------------------------------ public API

    def sigma_max_for(self, name: str) -> float:
        """The RMS→RMS cap for parameter ``name``."""
        if isinstance(self._caps, float):
            return self._caps
        name = matrix_of(name)  # a row block has its matrix's cap
        if name in self._caps:
            return self._caps[name]
        for pattern, cap in self._caps.items():
            if fnmatch.fnmatchcase(name, pattern):
                return cap
        raise ConfigError(f"no sigma_max for parameter {name!r}; add it or a '*' default to sigma_max")

    def apply(self, name: str, W: Tensor, *, lr: float, update_norm: float | None) -> Tensor:
        """Constrained copy of W (d_out, d_in) in W's dtype and device.

        update_norm bounds this step's RMS→RMS update (Muon: lr·NS_MAX_GAIN·margin), or
        None when there is no bound (AdamW). Weight decay uses weight_decay·lr.
        """
        return self.apply_many({name: W}, lr=lr, update_norms={name: update_norm})[name]

    def apply_many(
        self,
        named: Mapping[str, Tensor],
        *,
        lr: float,
        update_norms: Mapping[str, float | None] | None = None,
    ) -> dict[str, Tensor]:
        """Constrain many matrices, batching those with equal shape, dtype and device.

        Returns a new dict with the same keys (and order); inputs are not modified.
        Names missing from update_norms count as None (no bound).
        """
        update_norms = update_norms or {}
        for name, W in named.items():
            if W.dim() != 2:
                raise ConfigError(
                    f"constraint method {self.method!r} acts on matrices, but {name!r} has shape "
                    f"{tuple(W.shape)}; exclude it from the constrained parameters"
                )
        self.calls += len(named)
        if self.method == "none":
            return dict(named)
        units, unit_mus = self._split_blocks(named, update_norms)
        out: dict[str, Tensor] = {}
        for names in self._groups(units):
            mats = [units[n] for n in names]
            W = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)
            mus = [unit_mus.get(n) for n in names]
            out.update(zip(names, self._apply_group(names, W, lr, mus).unbind(0)))
        return {name: (torch.cat([out[block_key(name, h)] for h in range(self.row_blocks[name])])
                       if name in self.row_blocks else out[name]) for name in named}

    def _split_blocks(
        self, named: Mapping[str, Tensor], update_norms: Mapping[str, float | None]
    ) -> tuple[dict[str, Tensor], dict[str, float | None]]:
        """Matrices with row blocks → one (d_out/H, d_in) unit per block, keyed `name[h]`, with
        the block's update bound √H·μ. Other matrices pass through."""
        units: dict[str, Tensor] = {}
        mus: dict[str, float | None] = {}
        for name, W in named.items():
            H = self.row_blocks.get(name, 1)
            if H == 1:
                units[name], mus[name] = W, update_norms.get(name)
                continue
            if W.size(0) % H:
                raise ConfigError(f"{name!r} has {W.size(0)} rows, not divisible into {H} head blocks; "
                                  "check model.n_heads")
            mu = update_norms.get(name)
            mu = None if mu is None else mu * math.sqrt(H)
            for h, block in enumerate(W.chunk(H, dim=0)):
                units[block_key(name, h)], mus[block_key(name, h)] = block, mu
        return units, mus

    def state_dict(self) -> dict[str, Tensor]:
        """Power-iteration vectors keyed by parameter name (CPU float32 copies)."""
        return {name: v.detach().to("cpu", torch.float32).clone() for name, v in self._vectors.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore vectors saved by :meth:`state_dict` (moved to the right device on use)."""
        self._vectors = {name: v.detach().to(torch.float32).clone() for name, v in state.items()}

    # ------------------------------------------------------------ internals

    @staticmethod
    def _groups(named: Mapping[str, Tensor]) -> list[list[str]]:
        """Names grouped by (shape, dtype, device), in first-seen order."""
        groups: dict[tuple, list[str]] = {}
        for name, W in named.items():
            groups.setdefault((tuple(W.shape), W.dtype, W.device), []).append(name)
        return list(groups.values())

    def _apply_group(self, names: list[str], W: Tensor, lr: float, mus: list[float | None]) -> Tensor:
        """W (B, d_out, d_in) in its dtype → constrained (B, d_out, d_in), same dtype."""
        scale = rms_scale(W.shape)
        X = W.to(torch.promote_types(W.dtype, torch.float32)) / scale
        margin = rounding_margin(W.dtype)
        caps = torch.tensor(
            [self.sigma_max_for(n) * (1.0 - margin) for n in names], dtype=X.dtype, device=X.device
        )
        return (self._constrain(names, X, caps, lr, mus) * scale).to(W.dtype)

    def _constrain(
        self, names: list[str], X: Tensor, caps: Tensor, lr: float, mus: list[float | None]
    ) -> Tensor:
        """The method's map on W̃ = X (B, m, n) in working precision, caps (B,)."""
        lam_eta = self.weight_decay * lr
        if lam_eta >= 1:
            raise ConfigError(f"weight_decay·lr = {lam_eta:.4g} >= 1 would flip the weights; lower either")
        if lam_eta > 0:
            X = weight_decay(X, lam_eta)
        method = self.method
        if method == "weight_decay":
            return X
        if method == "stiefel":
            return stiefel(X, caps)
        if method == "exact_cap":
            return exact_cap(X, caps)
        if method == "soft_cap":
            return self._soft_cap(names, X, caps, lam_eta, mus)
        # Caps need σ₁ from above (a guaranteed bound); decays and the hammer need u₁, v₁.
        if method == "spectral_normalize":
            return spectral_normalize(X, caps, sigma_upper_bound(X))
        if method == "hard_cap":
            return hard_cap(X, caps, sigma_upper_bound(X))
        sigma, u, v = self._estimate(names, X)
        if method == "spectral_weight_decay":
            return spectral_weight_decay(X, self.spectral_wd, u, v, sigma)
        return spectral_hammer(X, caps, u, v, sigma)

    def _soft_cap(
        self, names: list[str], X: Tensor, caps: Tensor, lam_eta: float, mus: list[float | None]
    ) -> Tensor:
        """Soft cap with α per matrix; k from the update bound or, without one, from σ̃.

        With a bound μ, the previous step left ‖W‖ ≤ σmax (the stored cap, not the working
        cap c = σmax(1 − margin)), so k = σmax(1 − λη) + μ; the margin is added to μ.
        Without one, X is already weight-decayed and k = max(c, σ̄), with σ̄ the guaranteed
        upper bound of σ₁; matrices whose σ̄ is beyond the soft cap's range get the hard cap.
        """
        cap_list = caps.tolist()
        slack = [(self.sigma_max_for(n) - c) * (1.0 - lam_eta) for n, c in zip(names, cap_list)]
        # A head block's √H·μ can exceed the coupling's range where the whole matrix's μ does not:
        # such a block is measured instead (σ̄ from above), as without an update bound.
        mus = [None if mu is not None and matrix_of(n) != n and mu + d > SOFT_CAP_MAX_MU * c else mu
               for n, mu, d, c in zip(names, mus, slack, cap_list)]
        if all(mu is not None for mu in mus):
            alphas = [soft_cap_alpha(c, mu + d, lam_eta) for c, mu, d in zip(cap_list, mus, slack)]
            return soft_cap(X, torch.tensor(alphas, dtype=X.dtype, device=X.device))
        sigma = sigma_upper_bound(X)  # from above: an under-estimate would leave σ₁ over the cap
        alphas, fallback = [], []
        for i, (c, mu, d, s) in enumerate(zip(cap_list, mus, slack, sigma.tolist())):
            if mu is None and s - c > SOFT_CAP_MAX_MU * c:
                fallback.append(i)
                alphas.append(0.0)
            elif mu is None:
                alphas.append(soft_cap_alpha(c, max(0.0, s - c)))
            else:
                alphas.append(soft_cap_alpha(c, mu + d, lam_eta))
        Y = soft_cap(X, torch.tensor(alphas, dtype=X.dtype, device=X.device))
        if fallback:
            self._warn_fallback(names[fallback[0]])
            idx = torch.tensor(fallback, device=X.device)
            Y[idx] = hard_cap(X[idx], caps[idx], sigma[idx])
        return Y

    def _warn_fallback(self, name: str) -> None:
        if not self._warned_fallback:
            warnings.warn(
                f"soft cap without an update bound in the coupling's range: {name!r} has σ₁ beyond "
                f"{1 + SOFT_CAP_MAX_MU}·its cap, using the hard cap for such matrices "
                "(warned once)"
            )
            self._warned_fallback = True

    def _estimate(self, names: list[str], X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Warm-started power iteration on X (B, m, n); stores the new vectors."""
        first_use = any(n not in self._vectors for n in names)
        v0 = torch.stack([self._vector(n, X.size(-1)) for n in names]).to(X.device, X.dtype)
        sigma, u, v = power_iteration(X, v0, FIRST_USE_ITERS if first_use else self.power_iters)
        self._vectors.update(zip(names, v.unbind(0)))
        return sigma, u, v

    def _vector(self, name: str, n: int) -> Tensor:
        """The stored vector for ``name``, or a fresh one seeded from (seed, name)."""
        if name not in self._vectors:
            digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            return torch.randn(n, generator=gen)
        v = self._vectors[name]
        if v.numel() != n:
            raise CheckpointError(
                f"power-iteration vector for {name!r} has length {v.numel()}, expected {n}; "
                "the constrainer state does not match this model"
            )
        return v

"""The stateful side of the constraints: one method applied to named matrices (and head blocks)
after every optimiser step, with persistent seeded power-iteration vectors (docs/method.md#constraints)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from distlip.config.checks import check_coefficients, check_method
from distlip.errors import CheckpointError, ConfigError
from distlip.lipschitz.constraints import (
    SOFT_CAP_MAX_MU,
    check_cap,
    exact_cap,
    hard_cap,
    rounding_margin,
    soft_cap,
    soft_cap_alpha,
    spectral_hammer,
    spectral_normalize,
    spectral_weight_decay,
    stiefel,
    weight_decay,
)
from distlip.lipschitz.spectral import power_iteration, rms_scale, sigma_upper_bound, start_vector
from distlip.model import block_key, matrix_of

# Power-iteration steps for a vector's first use (later steps warm-start).
FIRST_USE_ITERS = 100


class Constrainer:
    """Applies one constraint method to named matrices, step after step.

    Keeps one persistent power-iteration vector per parameter name, seeded from
    (seed, name) with a private generator, so every replica starts from the same vector,
    and warm-started each step (FIRST_USE_ITERS iterations on first use, then
    `power_iters`). `calls` counts matrices handed to apply/apply_many.

    sigma_max is an RMS→RMS cap: a float for every matrix, or a mapping from parameter names
    to caps (what `lipschitz.caps.matrix_caps` gives: caps are worked out there, not here).

    row_blocks maps a parameter name to a number of row blocks H (attention heads): such a
    (d_out, d_in) matrix is constrained as H matrices (d_out/H, d_in), each in its own RMS→RMS
    units √(d_in·H/d_out)·σ₁ and under the matrix's cap, so that every head's block is capped.
    Caps ≤ c on every block imply ‖W‖ ≤ c for the whole matrix (‖W‖² ≤ mean over blocks of
    their norms²). A block of an update whose norm is ≤ μ has norm ≤ √H·μ: the soft cap's
    coupling uses that bound per block, or, when it is beyond the coupling's range, the
    block's measured σ₁ bound (as without an update bound). With `blockwise_updates` the
    optimiser stepped each block as its own matrix (per-head Muon) and the update bound it
    reports holds for every block as it is. Vectors and state are per block, keyed `name[h]`.
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
        blockwise_updates: bool = False,
    ) -> None:
        self.method = check_method(method)
        self.row_blocks = {n: int(h) for n, h in (row_blocks or {}).items() if h > 1}
        self.blockwise_updates = bool(blockwise_updates)
        if isinstance(sigma_max, Mapping):
            self._caps = {k: check_cap(c, f"sigma_max[{k!r}]") for k, c in sigma_max.items()}
        else:
            self._caps = check_cap(sigma_max, "sigma_max")
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
        """The RMS→RMS cap for parameter `name`."""
        if isinstance(self._caps, float):
            return self._caps
        name = matrix_of(name)  # a row block has its matrix's cap
        if name not in self._caps:
            raise ConfigError(f"no sigma_max for parameter {name!r}; add it to sigma_max")
        return self._caps[name]

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
        the block's update bound (√H·μ, or μ under blockwise_updates). Other matrices pass through."""
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
            mu = None if mu is None or self.blockwise_updates else mu * math.sqrt(H)
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
                "(warned once)",
                stacklevel=3,
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
        """The stored vector for `name`, or a fresh one seeded from (seed, name)."""
        if name not in self._vectors:
            return start_vector(self.seed, name, n)
        v = self._vectors[name]
        if v.numel() != n:
            raise CheckpointError(
                f"power-iteration vector for {name!r} has length {v.numel()}, expected {n}; "
                "the constrainer state does not match this model"
            )
        return v

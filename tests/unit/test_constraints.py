"""Weight constraints and Newton–Schulz against the SVD oracle (docs/method.md#constraints, #muon)."""

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from distlip.config.choices import METHODS
from distlip.errors import ConfigError
from distlip.lipschitz.certificate import SigmaEstimator
from distlip.lipschitz.constrainer import Constrainer
from distlip.lipschitz.constraints import (
    HARD_CAP_COEFFS,
    HARD_CAP_PEAK,
    HARD_CAP_RANGE,
    SOFT_CAP_MAX_MU,
    embed_cap,
    exact_cap,
    soft_cap_alpha,
)
from distlip.lipschitz.newton_schulz import MUON_NS_COEFFS, NS_MAX_GAIN, msign, orthogonalize
from distlip.lipschitz.spectral import power_iteration, rms_norm, rms_scale, start_vector

CAP_METHODS = ("hard_cap", "soft_cap", "spectral_normalize", "stiefel", "exact_cap")


def composite(x, coeffs):
    """The scalar map σ ← aσ + bσ³ + cσ⁵ applied for each (a, b, c)."""
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x


def with_singular_values(s, m, n, seed=0):
    """An m×n float32 matrix with singular values s (len ≤ min(m, n), rest zero)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((U * torch.tensor(s, dtype=torch.float64)) @ V.T).float()


def svals(W):
    """Singular values of W, descending, float64."""
    return torch.linalg.svdvals(W.double())


def matrix(kind, sigma_max, seed=0):
    """Test matrices (d_out, d_in) in physical units; their RMS→RMS norm is noted."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # square Gaussian, norm ≈ 1.5·σmax
        return 0.1 * sigma_max * torch.randn(64, 64, generator=g)
    if kind == "near":  # just above the cap, where the soft cap uses k = σ̃
        W = torch.randn(40, 56, generator=g)
        return W * (1.15 * sigma_max / rms_norm(W).float())
    if kind == "huge":  # norm ≈ 59·σmax, far beyond the hard cap polynomial: normalised first
        return 3.0 * sigma_max * torch.randn(48, 80, generator=g)
    if kind == "rank_deficient":  # rank 3, norm 2.5·σmax
        W = with_singular_values([2.5 * sigma_max, 1.2 * sigma_max, 0.3 * sigma_max], 40, 40, seed)
        return W * rms_scale(W.shape)
    if kind == "tall":  # norm ≈ 2.6·σmax
        return 0.3 * sigma_max * torch.randn(96, 32, generator=g)
    if kind == "wide":  # norm ≈ 2.1·σmax
        return 0.08 * sigma_max * torch.randn(32, 96, generator=g)
    assert kind == "feasible"  # every singular value already ≤ 0.8·σmax
    W = 0.2 * torch.randn(48, 64, generator=g)
    return exact_cap(W / rms_scale(W.shape), 0.8 * sigma_max) * rms_scale(W.shape)


KINDS = ("random", "near", "huge", "rank_deficient", "tall", "wide", "feasible")


# ------------------------------------------------------------- Newton–Schulz


def test_muon_composite_peaks_at_ns_max_gain():
    x = np.linspace(0.0, 1.0, 400_001)
    y = composite(x, MUON_NS_COEFFS)
    assert abs(y.max() - NS_MAX_GAIN) < 1e-5
    assert y.min() >= 0.0


def test_orthogonalize_never_exceeds_gain_but_reaches_it():
    g = torch.Generator().manual_seed(1)
    for shape in [(16, 64, 64), (8, 96, 32), (8, 32, 96)]:
        O = orthogonalize(torch.randn(*shape, generator=g))
        assert O.shape == shape and svals(O).max() <= 1.146
        if shape[1] != shape[2]:  # well-conditioned: every σ ends in [0.977, 1.146]
            assert svals(O).min() >= 0.97
    # Put one Frobenius-normalised singular value at the composite's argmax.
    x = np.linspace(0.0, 1.0, 400_001)
    peak = float(x[np.argmax(composite(x, MUON_NS_COEFFS))])
    rest = [math.sqrt((1 - peak**2) / 31)] * 31
    O = orthogonalize(with_singular_values([peak] + rest, 32, 48))
    assert 1.14 <= svals(O).max() <= 1.146


def test_orthogonalize_batched_dtype_and_orientation():
    g = torch.Generator().manual_seed(2)
    G = torch.randn(4, 24, 40, generator=g)
    batched = orthogonalize(G)
    single = torch.stack([orthogonalize(x) for x in G])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    # A tall matrix is orthogonalised as the transpose of its wide form.
    torch.testing.assert_close(orthogonalize(G[0].T), batched[0].T, atol=1e-5, rtol=1e-5)
    low = orthogonalize(G.bfloat16(), dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16 and svals(low.float()).max() < 1.2


def test_msign_is_accurate_and_never_above_one():
    g = torch.Generator().manual_seed(3)
    for shape in [(48, 80), (80, 48)]:
        s = svals(msign(torch.randn(*shape, generator=g)))
        assert (s - 1).abs().max() < 1e-4
    s = svals(msign(with_singular_values([5.0, 1.0, 0.01], 30, 50)))
    assert (s[:3] - 1).abs().max() < 1e-4 and s[3:].max() < 1e-2 and s.max() <= 1 + 1e-6
    assert torch.equal(msign(torch.zeros(8, 12)), torch.zeros(8, 12))


# ------------------------------------------------------------- hard-cap polynomial


def test_hard_cap_polynomial_constants():
    x = np.linspace(0.0, 3.53, 700_001)
    y = composite(x, HARD_CAP_COEFFS)
    assert 1.01088 <= y.max() <= HARD_CAP_PEAK
    assert abs(x[np.argmax(y[x < 2])] - 1.185) < 1e-3
    assert abs(composite(1.0, HARD_CAP_COEFFS) - 0.966) < 1e-3
    assert y.min() >= 0.0
    assert composite(3.8, HARD_CAP_COEFFS) < -0.99  # broken beyond the range
    assert HARD_CAP_RANGE * HARD_CAP_PEAK <= 3.53


# ------------------------------------------------------------- caps vs the oracle


@pytest.mark.filterwarnings("ignore:soft cap without an update bound")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", CAP_METHODS)
def test_cap_methods_respect_cap(method, kind):
    sigma_max = 2.0
    W = matrix(kind, sigma_max)
    Y = Constrainer(method, sigma_max).apply("w", W, lr=0.1, update_norm=None)
    assert Y.shape == W.shape and Y.dtype == W.dtype
    assert rms_norm(Y).item() <= sigma_max * (1 + 1e-3)
    if method == "stiefel":
        s = svals(Y / rms_scale(W.shape))
        rank = int((svals(W) > 1e-4 * svals(W)[0]).sum())
        assert (s[:rank] - sigma_max).abs().max() < 1e-3 * sigma_max
        assert (s[rank:] < 1e-2 * sigma_max).all()


@pytest.mark.parametrize("method", ["exact_cap", "spectral_normalize"])
def test_feasible_matrix_left_unchanged(method):
    W = matrix("feasible", 1.0)
    Y = Constrainer(method, 1.0).apply("w", W, lr=0.1, update_norm=None)
    assert (Y - W).norm() <= 1e-4 * W.norm()


def test_hard_cap_keeps_small_and_caps_large_singular_values():
    s_in = [2.9, 2.0, 1.5, 1.0, 0.5, 0.25]
    W = with_singular_values(s_in, 24, 24)  # square: physical and RMS units coincide
    s_out = svals(Constrainer("hard_cap", 1.0).apply("w", W, lr=0.0, update_norm=None))[:6]
    assert s_out.max() <= 1.0 + 1e-5
    assert (s_out[:4] >= 0.95).all()  # capped ones land in [0.95, 1]
    assert torch.allclose(s_out[4:], torch.tensor([0.5, 0.25], dtype=torch.float64), rtol=0.05)


# ------------------------------------------------------------- other maps


def test_spectral_hammer_sets_top_singular_value():
    s_in = [3.0, 1.5, 0.7, 0.2]
    scale = rms_scale((40, 24))
    W = with_singular_values(s_in, 40, 24) * scale
    Y = Constrainer("spectral_hammer", 1.0).apply("w", W, lr=0.0, update_norm=None)
    expected = torch.tensor(sorted([1.0] + s_in[1:], reverse=True), dtype=torch.float64)
    torch.testing.assert_close(svals(Y / scale)[:4], expected, atol=1e-4, rtol=1e-4)


def test_spectral_weight_decay_shrinks_only_the_top():
    s_in = [3.0, 1.5, 0.7]
    W = with_singular_values(s_in, 30, 30)  # square: physical and RMS units coincide
    Y = Constrainer("spectral_weight_decay", 1.0, spectral_wd=0.1).apply("w", W, lr=5.0, update_norm=None)
    expected = torch.tensor([2.7, 1.5, 0.7], dtype=torch.float64)  # λ not scaled by lr
    torch.testing.assert_close(svals(Y)[:3], expected, atol=1e-4, rtol=1e-4)


def test_weight_decay_scales_by_lambda_lr():
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(4))
    Y = Constrainer("weight_decay", 1.0, weight_decay=0.5).apply("w", W, lr=0.2, update_norm=None)
    torch.testing.assert_close(Y, 0.9 * W)


def test_embed_cap_scales_only_long_rows():
    E = torch.randn(10, 16, generator=torch.Generator().manual_seed(5))
    E[:5] *= 0.3
    Y = embed_cap(E)
    rms = Y.pow(2).mean(-1).sqrt()
    assert rms.max() <= 1.0
    torch.testing.assert_close(Y[:5], E[:5])
    assert embed_cap(3 * E.bfloat16()).float().pow(2).mean(-1).sqrt().max() <= 1.0


def test_power_iteration_matches_oracle_and_survives_zero():
    W = torch.stack([with_singular_values([2.0, 1.0, 0.5], 20, 30, seed) for seed in range(3)])
    v0 = torch.randn(3, 30, generator=torch.Generator().manual_seed(6))
    sigma, u, v = power_iteration(W, v0, 30)
    torch.testing.assert_close(sigma, torch.full((3,), 2.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.vector_norm(W @ v.unsqueeze(-1), dim=(-2, -1)), sigma)
    sigma0, _, v_zero = power_iteration(torch.zeros(20, 30), v0[0], 3)
    assert sigma0 == 0 and torch.allclose(v_zero, v0[0] / v0[0].norm())


# ------------------------------------------------------------- soft-cap coupling


def test_soft_cap_alpha_published_values_and_root():
    assert abs(soft_cap_alpha(1.0, 0.06) - 0.132) < 1e-3
    assert abs(soft_cap_alpha(1.0, 0.006) - 0.045) < 1e-3
    for sigma_max, mu, lam_eta in [(1.0, 0.06, 0.0), (2.0, 0.3, 0.01), (0.5, 0.1, 0.1), (8.0, 1.0, 0.0)]:
        alpha = soft_cap_alpha(sigma_max, mu, lam_eta)
        k = sigma_max * (1 - lam_eta) + mu
        p1 = k - alpha * k**3
        assert abs(p1 + alpha * p1**3 - sigma_max) < 1e-9 * sigma_max
        # The quartic of docs/method.md#constraints, solved independently.
        roots = np.roots([-(k**9), 3 * k**7, -3 * k**5, 0.0, k - sigma_max])
        real = sorted(r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= 0)
        assert abs(alpha - real[0]) < 1e-9 * max(1.0, real[0])
    assert soft_cap_alpha(1.0, 0.05, 0.1) == 0.0  # k < σmax: nothing to cap


def test_soft_cap_composite_stays_under_cap_within_range():
    for sigma_max in (0.5, 1.0, 4.0):
        for mu in np.linspace(1e-3, SOFT_CAP_MAX_MU, 30) * sigma_max:
            alpha = soft_cap_alpha(sigma_max, float(mu))
            s = np.linspace(0.0, sigma_max + mu, 20_001)
            y = s - 3 * alpha**2 * s**5 + 3 * alpha**3 * s**7 - alpha**4 * s**9
            assert y.max() <= sigma_max * (1 + 1e-12)
    # Beyond the range the composite overshoots: 1.028 at μ = 0.5 (docs/method.md#constraints).
    roots = np.roots([-(1.5**9), 3 * 1.5**7, -3 * 1.5**5, 0.0, 0.5])
    alpha = min(r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= 0)
    s = np.linspace(0.0, 1.5, 20_001)
    assert abs((s - 3 * alpha**2 * s**5 + 3 * alpha**3 * s**7 - alpha**4 * s**9).max() - 1.028) < 1e-3
    with pytest.raises(ConfigError, match="hard_cap"):
        soft_cap_alpha(1.0, 0.5)


def test_soft_cap_with_muon_update_bound():
    sigma_max, mu = 1.0, 0.06
    g = torch.Generator().manual_seed(7)
    W0 = exact_cap(torch.randn(48, 48, generator=g), sigma_max)  # several σ at the cap
    U, _, Vh = torch.linalg.svd(W0)
    W = W0 + mu * torch.outer(U[:, 0], Vh[0])  # worst case: σ₁ = σmax + μ = k exactly
    Y = Constrainer("soft_cap", sigma_max).apply("w", W, lr=0.05, update_norm=mu)
    assert abs(rms_norm(Y).item() - sigma_max) < 1e-4


def test_soft_cap_without_bound_falls_back_to_hard_cap_once():
    c = Constrainer("soft_cap", 1.0)
    with pytest.warns(UserWarning, match="hard cap"):
        Y = c.apply("w", matrix("random", 1.0), lr=0.1, update_norm=None)
    assert rms_norm(Y).item() <= 1.0 + 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        c.apply("w", matrix("random", 1.0, seed=1), lr=0.1, update_norm=None)


# ------------------------------------------------------------- the Constrainer


@pytest.mark.parametrize("method", METHODS[1:])
def test_batched_equals_per_matrix(method):
    g = torch.Generator().manual_seed(8)
    named = {f"sq{i}": 0.2 * torch.randn(32, 32, generator=g) for i in range(3)}
    named["tall"] = 0.2 * torch.randn(48, 16, generator=g)
    kwargs = {"weight_decay": 0.1 if method == "weight_decay" else 0.0,
              "spectral_wd": 0.1 if method == "spectral_weight_decay" else 0.0}
    norms = {n: 0.05 for n in named}
    batched = Constrainer(method, 1.0, **kwargs).apply_many(named, lr=0.1, update_norms=norms)
    assert list(batched) == list(named)
    for name, W in named.items():
        single = Constrainer(method, 1.0, **kwargs).apply(name, W, lr=0.1, update_norm=0.05)
        torch.testing.assert_close(batched[name], single, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("method", CAP_METHODS)
def test_bf16_parameter_stays_under_cap_after_cast(method):
    g = torch.Generator().manual_seed(9)
    c = Constrainer(method, 1.0)
    for shape in [(128, 128), (256, 64)]:
        W0 = exact_cap(torch.randn(*shape, generator=g) / rms_scale(shape), 1.0) * rms_scale(shape)
        D = torch.randn(*shape, generator=g)
        W = (W0 + 0.05 * D / rms_norm(D).float()).bfloat16()  # update norm 0.05 ≤ 0.06
        Y = c.apply(f"w{shape}", W, lr=0.1, update_norm=0.06)
        assert Y.dtype == torch.bfloat16
        assert rms_norm(Y.float()).item() <= 1.0


def test_constrainer_is_deterministic_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(10)
    steps = [{"a": 0.3 * torch.randn(24, 24, generator=g), "b": 0.3 * torch.randn(24, 40, generator=g)}
             for _ in range(3)]
    rng = torch.get_rng_state()
    outs = []
    for _ in range(2):
        c = Constrainer("spectral_hammer", 1.0, seed=3)
        outs.append([c.apply_many(named, lr=0.1) for named in steps])
    assert torch.equal(torch.get_rng_state(), rng)
    for x, y in zip(*outs):
        assert all(torch.equal(x[n], y[n]) for n in x)
    other = Constrainer("spectral_hammer", 1.0, seed=4)
    other.apply_many(steps[0], lr=0.1)
    first = Constrainer("spectral_hammer", 1.0, seed=3)
    first.apply_many(steps[0], lr=0.1)
    assert not torch.equal(other.state_dict()["a"], first.state_dict()["a"])


def test_state_dict_round_trip_resumes_identically():
    g = torch.Generator().manual_seed(11)
    named = {"a": 0.3 * torch.randn(24, 24, generator=g)}
    c = Constrainer("spectral_hammer", 1.0, power_iters=1)
    c.apply_many(named, lr=0.1)
    resumed = Constrainer("spectral_hammer", 1.0, power_iters=1)
    resumed.load_state_dict(c.state_dict())
    nxt = {"a": named["a"] + 0.01}
    assert torch.equal(c.apply_many(nxt, lr=0.1)["a"], resumed.apply_many(nxt, lr=0.1)["a"])


def test_calls_inputs_and_per_name_caps():
    c = Constrainer("exact_cap", {"head.weight": 0.5, "h.0.w": 2.0})
    g = torch.Generator().manual_seed(12)
    named = {"head.weight": torch.randn(40, 16, generator=g), "h.0.w": torch.randn(16, 16, generator=g)}
    before = {n: W.clone() for n, W in named.items()}
    out = c.apply_many(named, lr=0.1)
    assert c.calls == 2 and all(torch.equal(named[n], before[n]) for n in named)
    assert abs(rms_norm(out["head.weight"]).item() - 0.5) < 1e-3
    assert abs(rms_norm(out["h.0.w"]).item() - 2.0) < 1e-3
    with pytest.raises(ConfigError, match="no sigma_max for parameter 'h.0.w'"):
        Constrainer("exact_cap", {"head.weight": 0.5}).sigma_max_for("h.0.w")
    with pytest.raises(ConfigError, match="no sigma_max for parameter 'h.0.w'"):  # no patterns: "*" is a name
        Constrainer("exact_cap", {"head.weight": 0.5, "*": 2.0}).apply_many(named, lr=0.1)


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'hard_cap'"):
        Constrainer("hardcap", 1.0)
    with pytest.raises(ConfigError, match="did you mean 'spectral_normalize'"):
        Constrainer("spectral_norm", 1.0)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ConfigError, match="sigma_max"):
            Constrainer("hard_cap", bad)
    with pytest.raises(ConfigError, match="sigma_max"):
        Constrainer("hard_cap", {"w": 0.0})
    with pytest.raises(ConfigError, match="weight_decay > 0"):
        Constrainer("weight_decay", 1.0)
    with pytest.raises(ConfigError, match="matrices"):
        Constrainer("hard_cap", 1.0).apply("bias", torch.zeros(4), lr=0.1, update_norm=None)
    with pytest.raises(ConfigError, match="overshoot"):
        Constrainer("soft_cap", 1.0).apply("w", torch.zeros(4, 4), lr=0.1, update_norm=0.4)


@pytest.mark.parametrize("kind", ["random", "orthogonal", "rank_deficient", "tall", "batched"])
def test_sigma_upper_bound_is_above_and_close_to_sigma_max(kind):
    from distlip.lipschitz.spectral import sigma_upper_bound
    g = torch.Generator().manual_seed(3)
    W = {"random": lambda: torch.randn(64, 48, generator=g),
         "orthogonal": lambda: torch.linalg.qr(torch.randn(96, 96, generator=g))[0],  # all σ equal: the worst case
         "rank_deficient": lambda: torch.randn(80, 3, generator=g) @ torch.randn(3, 40, generator=g),
         "tall": lambda: torch.randn(300, 20, generator=g),
         "batched": lambda: torch.randn(4, 30, 50, generator=g)}[kind]()
    exact = torch.linalg.matrix_norm(W.double(), ord=2)
    bound = sigma_upper_bound(W).double()
    assert (bound >= exact).all()
    assert (bound <= exact * 1.013).all()


def test_power_iteration_start_vectors_are_one_derivation_the_same_in_every_process():
    """The Constrainer and the SigmaEstimator start from `start_vector(seed, key)`: the same in
    another process (another hash salt), whatever the global RNG did, and different per key."""
    key = "blocks.0.attn.q.weight[1]"
    code = f"from distlip.lipschitz.spectral import start_vector; print(start_vector(3, {key!r}, 5).tolist())"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    v = torch.tensor(json.loads(there.stdout))
    torch.manual_seed(123)
    assert torch.equal(start_vector(3, key, 5), v)
    assert not torch.equal(start_vector(4, key, 5), v) and not torch.equal(start_vector(3, key[:-3], 5), v)
    assert torch.equal(Constrainer("hard_cap", 1.0, seed=3)._vector(key, 5), v)
    assert torch.equal(SigmaEstimator(seed=3)._init(key, 5, "cpu"), v)


@pytest.mark.parametrize("shape", [(4, 32, 96), (3, 96, 32), (2, 64, 64)])
def test_exact_cap_is_the_svd_cap(shape):
    """exact_cap (Gram eigendecomposition) against U·min(Σ, c)·Vᵀ from float64 SVD: tall, wide and
    square batches, one matrix already at the cap (many equal σ), one below it (left unchanged)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(*shape, generator=g)
    W[1] = exact_cap(W[1], 0.5)  # repeated σ at the cap
    W[-1] = W[-1] / torch.linalg.matrix_norm(W[-1], ord=2) * 0.6  # below the cap: kept
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    expected = ((U * S.clamp(max=0.7).unsqueeze(-2)) @ Vh).float()
    got = exact_cap(W, 0.7)
    assert got.dtype == W.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[-1], W[-1], rtol=1e-6, atol=1e-7)
    assert torch.linalg.matrix_norm(got.double(), ord=2).max() <= 0.7 * (1 + 1e-6)
    # a matrix below the new cap keeps its singular values, the repeated ones at 0.5 included
    torch.testing.assert_close(torch.linalg.svdvals(got[1].double()), torch.linalg.svdvals(W[1].double()),
                               rtol=0, atol=1e-6)

"""Certified radii against brute force, and the attack on predictions against the certificate."""

import math

import pytest
import torch
import torch.nn.functional as F

from distlip.config import ModelConfig
from distlip.lipschitz.adversarial import attack, margins, project
from distlip.lipschitz.certificate import certify, embed_rms_max, exact_norms
from distlip.lipschitz.constraints import embed_cap, exact_cap
from distlip.lipschitz.robustness import (
    bounds_at,
    certified_at,
    certified_radius,
    head_margin,
    norm_margin,
    top_two,
)
from distlip.model import LipschitzTransformer, matrix_names


def markov_tokens(n: int, vocab: int = 8, seed: int = 0) -> torch.Tensor:
    """A first-order chain: each token's successor is fixed 80% of the time, uniform otherwise."""
    g = torch.Generator().manual_seed(seed)
    succ, ids = torch.randperm(vocab, generator=g), [0]
    for _ in range(n - 1):
        ids.append(int(succ[ids[-1]]) if torch.rand(1, generator=g).item() < 0.8
                   else int(torch.randint(vocab, (1,), generator=g)))
    return torch.tensor(ids)


@torch.no_grad()
def cap_weights(model, cap: float) -> None:
    """Every matrix (each head block of W_q, W_k, W_v: what the per-head bound reads) at
    RMS→RMS norm ≤ `cap` by SVD, token vectors at RMS ≤ 1."""
    for name, p in model.named_parameters():
        if name == "embed.weight":
            p.copy_(embed_cap(p))
            continue
        H = model.cfg.n_heads if name.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight")) else 1
        for b in p.view(H, p.shape[0] // H, p.shape[1]):
            b.copy_(exact_cap(b, cap * math.sqrt(b.shape[0] / b.shape[1])))


def train_tiny(cap: float | None, n_heads: int = 1, steps: int = 200, seed: int = 0):
    """A 2×16 model trained by AdamW on `markov_tokens`, `cap_weights` after every step (None:
    unconstrained)."""
    torch.manual_seed(seed)
    ids = markov_tokens(4000)
    cfg = ModelConfig(vocab_size=8, d_model=16, n_layers=2, n_heads=n_heads, context=16)
    model = LipschitzTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        w = ids[torch.randint(0, len(ids) - 17, (16,), generator=g)[:, None] + torch.arange(17)]
        loss = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cap is not None:
            cap_weights(model, cap)
    model.eval()
    w = ids[torch.arange(0, 1024, 16)[:, None] + torch.arange(17)]
    return model, w[:, :-1], w[:, 1:]


def bounds(model):
    params = dict(model.named_parameters())
    norms = exact_norms({n: params[n] for n in matrix_names(model)}, model.cfg.n_heads)
    return norms, bounds_at(norms, model.cfg), embed_rms_max(params["embed.weight"])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[1, 4], ids=["1head", "4heads"])
def capped(request):
    return train_tiny(cap=1.0, n_heads=request.param)


def test_the_norm_factor_is_the_best_the_norm_alone_allows():
    # A change of per-token RMS ρ over n logits moves a pair apart by at most √(2n)·ρ, and a
    # change along e_b − e_a reaches it: no smaller factor follows from the RMS alone.
    n, a, b = 7, 2, 5
    dz = torch.zeros(n, dtype=torch.float64)
    dz[b], dz[a] = 1.0, -1.0
    rms = dz.pow(2).mean().sqrt()
    assert (dz[b] - dz[a]) / rms == pytest.approx(math.sqrt(2 * n))
    dz = torch.randn(100000, n, dtype=torch.float64)
    spread = (dz.amax(1) - dz.amin(1)) / dz.pow(2).mean(1).sqrt()
    assert spread.max() <= math.sqrt(2 * n) * (1 + 1e-12)


def test_head_margin_is_exact_for_a_head_alone():
    # With nothing between the perturbation and the head, z = U·h: moving h by head_margin
    # (per-token RMS) toward the closest competitor's row flips the prediction, and no
    # perturbation just under it does (searched by gradient ascent).
    g = torch.Generator().manual_seed(0)
    V, d = 11, 6
    U = torch.randn(V, d, generator=g, dtype=torch.float64)
    h = torch.randn(40, d, generator=g, dtype=torch.float64)
    z = h @ U.T
    k = head_margin(z, U, 1.0)
    pred, _ = top_two(z)
    gap = z.gather(1, pred[:, None]) - z
    diff = U[pred][:, None, :] - U[None, :, :]  # (N, V, d): u_a − u_b
    ratio = gap / (diff.norm(dim=-1) * math.sqrt(d))
    ratio.scatter_(1, pred[:, None], math.inf)
    b = ratio.argmin(1)
    direction = diff[torch.arange(40), b]
    step = direction / direction.pow(2).mean(-1, keepdim=True).sqrt()  # per-token RMS 1
    flipped = ((h - (k * (1 + 1e-9))[:, None] * step) @ U.T).argmax(-1)
    assert (flipped != pred).all()
    # One batched attack in a unit ball, scaled per prediction to 0.999·head_margin.
    scale = (0.999 * k)[:, None, None]
    f = lambda x: (h[:, None, :] + (x - h[:, None, :]) * scale) @ U.T  # noqa: E731
    assert attack(f, h[:, None, :], pred[:, None], 1.0, steps=60, restarts=3).all()


def test_head_margin_is_never_below_the_norm_margin():
    g = torch.Generator().manual_seed(1)
    V, d = 13, 5
    W = torch.randn(V, d, generator=g)
    z = torch.randn(200, d, generator=g) @ W.T
    head = torch.linalg.matrix_norm(W.double(), ord=2).item() * math.sqrt(d / V)  # RMS→RMS norm
    assert (head_margin(z, W, 1.0) * head >= norm_margin(z) * (1 - 1e-9)).all()


def test_bound_at_unit_rms_is_the_certificate_and_grows_with_rms(capped):
    model, x, _ = capped
    norms, (net_at, body_at), embed = bounds(model)
    cert = certify(norms, embed, model.cfg)
    assert net_at(1.0) == pytest.approx(cert.network_bound, rel=1e-12)
    assert body_at(1.0) * cert.head == pytest.approx(cert.network_bound, rel=1e-12)
    assert net_at(1.5) > net_at(1.0)


def test_radius_inverts_the_certified_condition():
    margin = torch.tensor([0.0, 1e-3, 0.5, 2.0, math.inf], dtype=torch.float64)
    r = certified_radius(margin, lambda R: 3.0, 1.0)
    finite = margin[1:4] / 3.0
    assert r[0] == 0 and r[-1] == math.inf
    assert ((r[1:4] <= finite) & (r[1:4] >= finite * (1 - 0.007))).all()
    grows = lambda R: 2.0 * R * R  # noqa: E731
    r = certified_radius(margin[1:4], grows, 1.0)
    assert certified_at(margin[1:4], grows, 1.0, 0.0).all()
    for m, e in zip(margin[1:4], r):
        assert certified_at(m[None], grows, 1.0, e.item()).item()
        assert not certified_at(m[None], grows, 1.0, e.item() * 1.007).item()


def test_logit_pairs_never_move_apart_faster_than_the_conversions_allow(capped):
    # Brute force on the conversion: random and gradient-ascent perturbations of every size;
    # each pair's change is within √(2n)·L·ε and within ‖u_a − u_b‖·√d·L_body·ε.
    model, x, _ = capped
    _, (net_at, body_at), embed = bounds(model)
    h = model.embed(x[:8]).detach()
    u = model.head.weight.detach().double() * model.cfg.logit_scale
    n, d = model.cfg.vocab_size, model.cfg.d_model
    pair = (u[:, None, :] - u[None, :, :]).norm(dim=-1) * math.sqrt(d)  # (V, V)
    g = torch.Generator().manual_seed(0)
    z0 = model.logits_from_embeddings(h).detach().double()
    for eps in (0.05, 0.3, 1.0):
        delta = project(torch.randn(h.shape, generator=g) * 10, eps)
        for _ in range(30):  # ascend the largest pairwise change
            delta.requires_grad_(True)
            dz = model.logits_from_embeddings(h + delta) - z0.float()
            (grad,) = torch.autograd.grad((dz.amax(-1) - dz.amin(-1)).sum(), delta)
            with torch.no_grad():
                step = grad / grad.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
                delta = project(delta + 0.3 * eps * step, eps)
        with torch.no_grad():
            dz = model.logits_from_embeddings(h + delta).double() - z0
        used = delta.pow(2).mean(-1).sqrt().max().item()
        R = embed + used
        spread = dz[..., :, None] - dz[..., None, :]  # (B, T, V, V): Δz_a − Δz_b
        assert spread.abs().amax().item() <= math.sqrt(2 * n) * net_at(R) * used
        assert (spread.abs() <= pair * body_at(R) * used * (1 + 1e-9)).all()


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_certified_predictions_survive_the_attack(capped, loss):
    # Tight caps (every matrix ≤ 1) make the certificate meaningful: most correct predictions
    # are certified at ε = 0.3, and the attack breaks them all by ε = 1. Certified must imply
    # unbroken, prediction by prediction: this can fail if the radius or the bound is wrong.
    model, x, y = capped
    norms, (_, body_at), embed = bounds(model)
    with torch.no_grad():
        z = model(x)
    correct = (z.argmax(-1) == y)
    k = head_margin(z.flatten(0, 1), model.head.weight, model.cfg.logit_scale).view_as(y)
    h = model.embed(x).detach()
    certified_any, broken_any = False, False
    for eps in (0.3, 0.45, 0.7, 1.0):
        cert = correct & certified_at(k, body_at, embed, eps)
        alive = attack(model.logits_from_embeddings, h, y, eps, steps=15, restarts=2, loss=loss)
        assert not (cert & ~alive).any(), f"attack broke {(cert & ~alive).sum()} certified predictions at ε={eps}"
        assert alive.float().mean() >= cert.float().mean()
        certified_any |= bool(cert.any())
        broken_any |= bool((correct & ~alive).any())
    assert certified_any and broken_any


def test_attack_lowers_accuracy_of_an_unconstrained_model():
    model, x, y = train_tiny(cap=None)
    h = model.embed(x).detach()
    clean = (model(x).argmax(-1) == y).float().mean().item()
    robust = attack(model.logits_from_embeddings, h, y, 0.5, steps=20, restarts=2).float().mean().item()
    assert clean > 0.6 and robust < clean - 0.2


def test_attack_stays_in_its_ball_and_on_its_positions():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 5, 4, generator=g) * 3
    positions = torch.tensor([True, False, True, False, False])
    p = project(delta, 0.4, positions)
    assert (p.pow(2).mean(-1).sqrt() <= 0.4 * (1 + 1e-6)).all()
    assert (p[:, ~positions] == 0).all()
    small = delta * 0.01
    assert torch.equal(project(small, 0.4), small)
    logits = torch.tensor([[[1.0, 3.0, 2.0]]])
    assert margins(logits, torch.tensor([[1]])).item() == pytest.approx(1.0)
    assert margins(logits, torch.tensor([[0]])).item() == pytest.approx(-2.0)


def test_attack_on_chosen_positions_leaves_earlier_predictions_alone(capped):
    # Causal attention: perturbing only the last position cannot change earlier predictions.
    model, x, y = capped
    h = model.embed(x[:4]).detach()
    positions = torch.zeros(x.shape[1], dtype=torch.bool)
    positions[-1] = True
    alive = attack(model.logits_from_embeddings, h, y[:4], 5.0, steps=10, restarts=2, positions=positions)
    clean = model(x[:4]).argmax(-1) == y[:4]
    assert torch.equal(alive[:, :-1], clean[:, :-1])

"""The certificate against attacks: the per-head attention bound holds where the whole-matrix one
fails, attacks never beat it (one attention layer, and embeddings → logits), and per-head caps
hold after every step for every capping method (exact float64 SVD of every head block)."""

import math

import pytest
import torch

from distlip.config import ModelConfig
from distlip.lipschitz.attack import jacobian_attack, max_rms, pair_attack
from distlip.lipschitz.certificate import certify, exact_norms
from distlip.lipschitz.constrainer import Constrainer
from distlip.lipschitz.spectral import rms_norm
from distlip.model import ATTN_OUT_SCALE, Attention, LipschitzTransformer, block_key, matrix_names

torch.set_num_threads(1)


def attention(H: int, d: int, s: float = 1.0, seed: int = 0, **model) -> Attention:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=10, d_model=d, n_heads=H, context=8, attn_scale=s, rotary_fraction=0.0, **model)
    return Attention(cfg).double()


def attention_bound(layer: Attention, s: float, heads: bool = True) -> float:
    """The certificate's attention constant at input token RMS ≤ 1 (one layer, r = 1)."""
    H, d = layer.n_heads, layer.q.weight.shape[1]
    cfg = ModelConfig(vocab_size=4, d_model=d, n_heads=H, n_layers=1, attn_scale=s)
    mats = {f"blocks.0.attn.{k}.weight": getattr(layer, k).weight for k in "qkvo"}
    mats |= {"blocks.0.mlp.fc_in.weight": torch.zeros(4 * d, d), "blocks.0.mlp.fc_out.weight": torch.zeros(d, 4 * d),
             "head.weight": torch.zeros(4, d)}
    return certify(exact_norms(mats, H if heads else None), 1.0, cfg).blocks[0]["attn"]


def whole_matrix_formula(layer: Attention, s: float) -> float:
    """The former bound: (1/3)‖W_o‖‖W_v‖(1 + 2 s ‖W_q‖‖W_k‖) from whole-matrix norms, r = 1."""
    n = {k: rms_norm(getattr(layer, k).weight).item() for k in "qkvo"}
    return ATTN_OUT_SCALE * n["o"] * n["v"] * (1 + 2 * s * n["q"] * n["k"])


def one_head_reads_all(H: int, d: int) -> Attention:
    """W_q = W_k = head 0's first coordinates only, W_v = W_o = I: every whole matrix has RMS→RMS
    norm 1, but head 0's query and key blocks have norm √H (√(d/d_head)·σ₁ with σ₁ = 1)."""
    layer = attention(H, d)
    dh = d // H
    with torch.no_grad():
        for w in (layer.q.weight, layer.k.weight):
            w.zero_()
            w[:dh, :dh] = torch.eye(dh)
        layer.v.weight.copy_(torch.eye(d))
        layer.o.weight.copy_(torch.eye(d))
    return layer


def two_token_grid(d: int, n: int = 41) -> torch.Tensor:
    """(n², 2, d): two tokens along the first coordinate, each with RMS in [0, 1]."""
    e = torch.linspace(-1, 1, n, dtype=torch.float64)
    e1, e2 = torch.meshgrid(e, e, indexing="ij")
    x = torch.zeros(n * n, 2, d, dtype=torch.float64)
    x[:, 0, 0], x[:, 1, 0] = e1.flatten() * d ** 0.5, e2.flatten() * d ** 0.5
    return x


def test_whole_matrix_formula_is_beaten_by_a_multi_head_layer_and_the_per_head_bound_is_not():
    layer = one_head_reads_all(H=16, d=16)
    found = jacobian_attack(layer, two_token_grid(16), iters=20)
    old = whole_matrix_formula(layer, 1.0)
    assert old == pytest.approx(1.0)
    assert found > 1.5 * old, f"attack {found:.4f} vs whole-matrix formula {old:.4f}"
    assert found <= attention_bound(layer, 1.0)
    # a norm table without head blocks falls back to √H·‖W‖ per head: still sound
    assert attention_bound(layer, 1.0, heads=False) >= attention_bound(layer, 1.0)


def exact_cap_per_head(layer: Attention, caps: dict[str, float]) -> None:
    """Cap every head block of W_q, W_k, W_v and the whole W_o at caps[k] (exact SVD)."""
    H = layer.n_heads
    c = Constrainer("exact_cap", {f"{k}": caps[k] for k in "qkvo"}, row_blocks={"q": H, "k": H, "v": H})
    with torch.no_grad():
        new = c.apply_many({k: getattr(layer, k).weight for k in "qkvo"}, lr=0.0)
        for k, w in new.items():
            getattr(layer, k).weight.copy_(w)


# The last cases add a positional bias (model.lookback): it does not depend on the input, so the
# bound is the same; a moderate bias keeps the softmax where it is most sensitive.
@pytest.mark.parametrize("H, s, model", [(1, 1.0, {}), (2, 2.0, {}), (4, 1.0, {}), (8, 4.0, {}),
                                         (4, 1.0, {"lookback": [1, 2, 0, 1], "lookback_bias": 1.5}),
                                         (2, 2.0, {"lookback": [1, 2], "lookback_bias": 8.0})])
def test_attacks_never_beat_the_attention_bound(H, s, model):
    d, T = 16, 3
    layer = attention(H, d, s, seed=H, **model)
    with torch.no_grad():  # spread the weights so every head block sits at its cap after capping
        for k in "qkvo":
            getattr(layer, k).weight.mul_(8.0)
    exact_cap_per_head(layer, {"q": 1.5, "k": 1.5, "v": 1.0, "o": 1.0})
    bound = attention_bound(layer, s)
    g = torch.Generator().manual_seed(H)
    x = torch.randn(16, T, d, generator=g, dtype=torch.float64)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * 0.7  # the radius-0.3 ball stays inside RMS ≤ 1
    pair = pair_attack(layer, x, 0.3, steps=30, restarts=4)
    jac = jacobian_attack(layer, x / 0.7, iters=20)
    print(f"H={H} s={s}: pair {pair:.4f} jacobian {jac:.4f} bound {bound:.4f}")
    assert 0 < max(pair, jac) <= bound


def tiny_network(H: int, cap: float, seed: int = 0, layers: int = 2, d: int = 16, **model):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=11, d_model=d, n_layers=layers, n_heads=H, context=8, attn_scale=2.0, **model)
    model = LipschitzTransformer(cfg).double()
    names = matrix_names(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].normal_().mul_(4.0)  # output projections too: no zero blocks
        c = Constrainer("exact_cap", {n: cap for n in names},
                        row_blocks={n: H for n in names if n.endswith(("q.weight", "k.weight", "v.weight"))})
        for n, w in c.apply_many({n: params[n] for n in names}, lr=0.0).items():
            params[n].copy_(w)
    norms = exact_norms({n: params[n] for n in names}, H)
    return model, cfg, norms


@pytest.mark.parametrize("H, model", [(1, {}), (4, {}), (8, {}), (4, {"lookback": [1, 2, 3], "lookback_bias": 2.0})])
def test_attacks_never_beat_the_network_certificate(H, model):
    model, cfg, norms = tiny_network(H, cap=1.5, seed=H, **model)
    cert = certify(norms, 1.0, cfg)
    assert all(norms[block_key("blocks.0.attn.q.weight", h)] == pytest.approx(1.5, rel=1e-4) for h in range(H) if H > 1)
    f = lambda h: model.head(model.hidden(h)) * cfg.logit_scale  # noqa: E731  float64, embeddings → logits
    g = torch.Generator().manual_seed(H)
    x = torch.randn(8, 4, cfg.d_model, generator=g, dtype=torch.float64)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * 0.75
    pair = pair_attack(f, x, 0.25, steps=30, restarts=4)
    jac = jacobian_attack(f, x, iters=20)
    print(f"H={H}: pair {pair:.4f} jacobian {jac:.4f} network bound {cert.network_bound:.4f}")
    assert 0 < max(pair, jac) <= cert.network_bound
    assert cert.network_bound < 100  # tight enough that the comparison means something


def test_max_rms_and_attacks_on_a_linear_map_find_its_norm():
    # f(x) = x Aᵀ per token: the operator norm in max-RMS units is √(d/V)·σ₁(A).
    torch.manual_seed(0)
    A = torch.randn(5, 8, dtype=torch.float64)
    f = lambda x: x @ A.T  # noqa: E731
    truth = math.sqrt(8 / 5) * torch.linalg.matrix_norm(A, ord=2).item()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert max_rms(x).shape == (2,)
    assert max_rms(x)[0] == pytest.approx(x[0].pow(2).mean(-1).sqrt().max().item())
    assert jacobian_attack(f, x, iters=30) == pytest.approx(truth, rel=1e-6)
    assert truth * 0.99 <= pair_attack(f, x, 0.5, steps=60) <= truth * (1 + 1e-9)


METHODS = ["soft_cap", "hard_cap", "spectral_normalize", "stiefel", "exact_cap"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("H, mu", [(4, 0.05), (8, 0.25)])
def test_every_head_block_is_under_its_cap_after_every_step(method, H, mu):
    """Muon-like steps (orthogonal updates of RMS→RMS norm μ) on W_q, W_v (d, d) and a wide
    (4d, d) matrix; after each constraint every head block's exact norm is ≤ its cap."""
    torch.manual_seed(H)
    d, cap = 32, 1.2
    names = {"q": (d, d), "v": (d, d), "fc_in": (4 * d, d)}
    blocks = {"q": H, "v": H}
    c = Constrainer(method, {"q": cap, "v": 2 * cap, "fc_in": cap}, row_blocks=blocks)
    W = {n: torch.randn(s) * 3 for n, s in names.items()}
    for step in range(6):
        upd = {}
        for n, w in W.items():
            q, _ = torch.linalg.qr(torch.randn(max(w.shape), min(w.shape)))
            o = q if w.shape[0] >= w.shape[1] else q.T
            upd[n] = mu * math.sqrt(w.shape[0] / w.shape[1]) * o
        stepped = {n: w + upd[n] for n, w in W.items()} if step else W
        W = c.apply_many(stepped, lr=0.1, update_norms={n: (mu if step else None) for n in W})
        for n, w in W.items():
            limit = c.sigma_max_for(n) * (1 + 1e-6)
            parts = w.reshape(blocks[n], -1, w.shape[1]) if n in blocks else w[None]
            worst = rms_norm(parts).max().item()
            assert worst <= limit, f"{method} step {step}: {n} block norm {worst} > cap {limit}"
            assert rms_norm(w).item() <= limit  # per-block caps imply the whole matrix's

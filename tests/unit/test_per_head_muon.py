"""Per-head Muon: W_q, W_k, W_v orthogonalised one head block at a time, so every block's step
is within the bound the per-head caps and the soft cap's coupling assume."""

import math
import warnings

import pytest
import torch

from distlip.config import load_config
from distlip.lipschitz.newton_schulz import NS_MAX_GAIN
from distlip.model import block_key
from distlip.optim import Optimizers

from helpers.trainers import SMOKE, make_trainer

H, D = 4, 64


def rms_norm(W: torch.Tensor) -> float:
    """RMS→RMS operator norm √(d_in/d_out)·σ₁, by exact SVD."""
    d_out, d_in = W.shape
    return math.sqrt(d_in / d_out) * torch.linalg.matrix_norm(W.double(), ord=2).item()


def one_step(per_head: bool, grad: torch.Tensor, lr: float = 0.1) -> torch.Tensor:
    cfg = load_config(SMOKE, ["optim.lr_mult={qkv: 1.0}", f"optim.lr={lr}", "optim.momentum=0"]).optim
    W = torch.nn.Parameter(torch.zeros(D, D))
    W.grad = grad.clone()
    name = "blocks.0.attn.q.weight"
    opt = Optimizers({name: W}, cfg, n_layers=1, row_blocks={name: H} if per_head else None)
    info = opt.step(0, 10)
    assert info.update_norms[name] == pytest.approx(lr * NS_MAX_GAIN)
    return W.detach().clone()


def test_a_whole_matrix_step_puts_up_to_sqrt_h_times_its_bound_in_one_head_and_per_head_does_not():
    g = torch.zeros(D, D)
    g[: D // H] = torch.randn(D // H, D, generator=torch.Generator().manual_seed(0))  # one head's gradient
    lr = 0.1
    whole, per_head = one_step(False, g, lr), one_step(True, g, lr)
    # whole matrix: head 0's rows are orthonormal, a block norm of √(d/d_head) = √H steps of lr
    assert rms_norm(whole[: D // H]) > 0.9 * math.sqrt(H) * lr
    for h, block in enumerate(per_head.chunk(H)):
        assert rms_norm(block) <= lr * NS_MAX_GAIN * (1 + 1e-5), h
    assert rms_norm(per_head[: D // H]) > 0.6 * lr  # the step is taken, not dropped


def test_per_head_step_is_muon_on_each_block():
    g = torch.randn(D, D, generator=torch.Generator().manual_seed(1))
    per_head = one_step(True, g)
    for h, gb in enumerate(g.chunk(H)):
        W = torch.nn.Parameter(torch.zeros(D // H, D))
        W.grad = gb.clone()
        cfg = load_config(SMOKE, ["optim.lr_mult={qkv: 1.0}", "optim.lr=0.1", "optim.momentum=0"]).optim
        Optimizers({"blocks.0.attn.q.weight": W}, cfg, n_layers=1).step(0, 10)
        torch.testing.assert_close(per_head.chunk(H)[h], W.detach(), rtol=0, atol=0)


def test_momentum_of_a_blocked_matrix_is_one_tensor_in_the_state():
    cfg = load_config(SMOKE, ["optim.lr_mult={qkv: 1.0}"]).optim
    W = torch.nn.Parameter(torch.zeros(D, D))
    W.grad = torch.ones(D, D)
    name = "blocks.0.attn.k.weight"
    opt = Optimizers({name: W}, cfg, n_layers=1, row_blocks={name: H})
    opt.step(0, 10)
    state = opt.state_dict()["momentum"]
    assert list(state) == [name] and state[name].shape == (D, D) and block_key(name, 0) not in state
    torch.testing.assert_close(state[name], (1 - cfg.momentum) * torch.ones(D, D))


def test_a_blocked_matrix_counts_as_one_orthogonalised_matrix():
    """`orthogonalized` counts matrices (the sharding tests compare it with ownership), not head blocks."""
    cfg = load_config(SMOKE, ["optim.lr_mult={qkv: 1.0}"]).optim
    params = {n: torch.nn.Parameter(torch.zeros(D, D)) for n in ("blocks.0.attn.q.weight", "blocks.0.mlp.fc.weight")}
    for p in params.values():
        p.grad = torch.ones(D, D)
    opt = Optimizers(params, cfg, n_layers=1, row_blocks={"blocks.0.attn.q.weight": H})
    opt.step(0, 10)
    opt.step(1, 10)
    assert opt.orthogonalized == 2 * len(params)


def test_soft_cap_keeps_its_coupling_per_head_and_every_block_stays_capped(tmp_path):
    """A learning rate whose whole-matrix step is beyond the soft cap's range per head block
    (√H·μ > 0.3·σmax) but within it per block: per-head Muon needs no hard-cap fallback."""
    over = ["model.d_model=32", "model.n_heads=4", "constraint.method=soft_cap", "constraint.sigma_max=1.0",
            "optim.lr=0.24", "optim.lr_mult={qkv: 1.0}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warns
        trainer = make_trainer(tmp_path / "ph", *over, "optim.per_head=true")
        for _ in range(4):
            trainer.train_step()
    with pytest.warns(UserWarning, match="soft cap without an update bound"):
        whole = make_trainer(tmp_path / "whole", *over, "optim.per_head=false")
        for _ in range(4):
            whole.train_step()
    for name, W in trainer.model.named_parameters():
        if name.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight")):
            for block in W.detach().chunk(4):
                assert rms_norm(block) <= 1.0 * (1 + 1e-5), name

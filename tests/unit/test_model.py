"""The architecture is the one docs/method.md#architecture describes."""

import math

import pytest
import torch
import torch.nn as nn

from distlip.config import ModelConfig, load_config
from distlip.data.packing import document_causal_mask
from distlip.errors import ConfigError
from distlip.model import GELU_MAX_SLOPE, LipschitzTransformer, is_output_projection, padded_vocab
from distlip.trainer import Trainer


def tiny(**kw) -> LipschitzTransformer:
    torch.manual_seed(0)
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=2, context=16)
    return LipschitzTransformer(ModelConfig(**{**base, **kw}))


def test_no_norm_modules_and_no_biases():
    model = tiny()
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, getattr(nn, "RMSNorm", nn.LayerNorm))
    assert not [m for m in model.modules() if isinstance(m, norm_types)]
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert m.bias is None
    assert all(p.dim() == 2 for p in model.parameters())


def test_gelu_slope_is_the_true_maximum():
    x = torch.linspace(-6, 6, 200001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.nn.functional.gelu(x).sum(), x)
    assert abs(grad.max().item() - GELU_MAX_SLOPE) < 1e-9
    assert grad.abs().max().item() <= GELU_MAX_SLOPE + 1e-12


def test_initialisation():
    model = tiny()
    for name, p in model.named_parameters():
        if name == "embed.weight":
            torch.testing.assert_close(p.pow(2).mean(1).sqrt(), torch.ones(p.shape[0]))
        elif is_output_projection(name):
            assert torch.count_nonzero(p) == 0, name
        else:  # orthogonal times √(d_out/d_in): RMS→RMS norm 1
            sigma = torch.linalg.matrix_norm(p.double(), 2).item()
            assert abs(sigma * math.sqrt(p.shape[1] / p.shape[0]) - 1) < 1e-5, name


def test_residuals_are_convex_with_alpha_one_over_twice_layers():
    model = tiny(n_layers=3)
    assert all(abs(b.alpha - 1 / 6) < 1e-12 for b in model.blocks)
    # zero output projections: each residual returns (1−α)·x, so 2L of them scale by (1−α)^(2L)
    h = torch.randn(2, 8, 32)
    torch.testing.assert_close(model.hidden(h), h * (1 - 1 / 6) ** 6)


def test_dropout_drops_branch_outputs_in_training_mode_only():
    plain, dropped = tiny(), tiny(dropout=0.5)
    with torch.no_grad():  # output projections start at zero, which would hide the branches
        for p, q in zip(plain.parameters(), dropped.parameters()):
            p.normal_(0, 0.2)
            q.copy_(p)
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert not torch.equal(dropped(idx), dropped(idx))
        torch.testing.assert_close(plain(idx), plain(idx))
        torch.testing.assert_close(dropped.eval()(idx), plain(idx))


def test_attention_scale_is_one_over_d_head_and_matches_reference():
    torch.manual_seed(1)
    model = tiny(attn_scale=3.0, rotary_fraction=0.5)
    attn = model.blocks[0].attn
    nn.init.normal_(attn.o.weight)
    assert attn.scale == pytest.approx(3.0 / attn.d_head)
    x = torch.randn(2, 8, 32)
    B, T, d, H, dh = 2, 8, 32, attn.n_heads, attn.d_head
    heads = lambda t: t.view(B, T, H, dh).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.q(x)), heads(attn.k(x)), heads(attn.v(x))
    q, k = attn.rotary(q), attn.rotary(k)
    logits = 3.0 * q @ k.transpose(-1, -2) / dh
    logits = logits.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    ref = attn.o((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d) / 3)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_lookback_heads_read_the_token_that_many_back_and_stay_causal():
    model = tiny(n_heads=4, lookback=[2, 0, 1], lookback_bias=40.0, rotary_fraction=0.0)
    attn = model.blocks[0].attn
    with torch.no_grad():  # no content scores: what a head reads is its positional bias alone
        attn.q.weight.zero_()
        attn.o.weight.copy_(torch.eye(32) * 3)  # undo the 1/3: the output is the heads' values
    x = torch.randn(1, 8, 32)
    v = attn.v(x).view(1, 8, attn.n_heads, attn.d_head)
    y = attn(x).view(1, 8, attn.n_heads, attn.d_head)
    torch.testing.assert_close(y[0, 2:, 0], v[0, :-2, 0], atol=1e-5, rtol=1e-5)  # head 0: two back
    torch.testing.assert_close(y[0, 1:, 2], v[0, :-1, 2], atol=1e-5, rtol=1e-5)  # head 2: one back
    causal_mean = v[0, :, 1].cumsum(0) / torch.arange(1, 9)[:, None]
    torch.testing.assert_close(y[0, :, 1], causal_mean, atol=1e-5, rtol=1e-5)  # head 1: no bias, uniform
    torch.testing.assert_close(y[0, :2, 0], v[0, :2, 0].cumsum(0) / torch.arange(1, 3)[:, None],
                               atol=1e-5, rtol=1e-5)  # no key two back yet: uniform over what is visible
    bias = attn.positional_bias(8, torch.float32)
    future = torch.ones(8, 8, dtype=torch.bool).triu(1)
    assert bias.shape == (4, 8, 8) and torch.isinf(bias[:, future]).all()
    assert bias[0].diagonal(-2).eq(40).all() and bias[:, ~future].count_nonzero() == 6 + 7  # heads 0 and 2 only


def test_rotary_rotates_only_the_configured_fraction_and_preserves_norm():
    model = tiny(rotary_fraction=0.5)
    rot = model.blocks[0].attn.rotary
    x = torch.randn(1, 2, 16, 16)
    y = rot(x)
    torch.testing.assert_close(y[..., rot.rot:], x[..., rot.rot:])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y[..., 1:, : rot.rot], x[..., 1:, : rot.rot])


def test_causal_logits_and_padded_head():
    model = tiny(vocab_size=50, pad_vocab_to=64)
    assert model.head.weight.shape == (64, 32) and padded_vocab(model.cfg) == 64
    nn.init.normal_(model.head.weight)
    for b in model.blocks:
        nn.init.normal_(b.attn.o.weight)
        nn.init.normal_(b.mlp.fc_out.weight)
    idx = torch.randint(0, 50, (1, 10))
    out = model(idx)
    assert out.shape == (1, 10, 50)
    idx2 = idx.clone()
    idx2[0, 7] = (idx2[0, 7] + 1) % 50
    torch.testing.assert_close(model(idx2)[:, :7], out[:, :7])  # the future does not leak


def test_document_mask_keeps_attention_inside_each_packed_document():
    model = tiny()
    with torch.no_grad():  # non-zero output projections, so attention reaches the logits
        for name, p in model.named_parameters():
            if is_output_projection(name):
                p.copy_(torch.randn_like(p) * 0.3)
    eot = 49
    x = torch.tensor([[eot, 3, 4, 5, eot, 6, 7, 8, 9, eot, 10, 11]])
    other = x.clone()
    other[0, 1:4] = torch.tensor([20, 21, 22])  # change only the first document
    masked = lambda t: model(t, document_causal_mask(t, eot))  # noqa: E731
    with torch.no_grad():
        same = masked(x)[0, 4:] - masked(other)[0, 4:]
        leaks = model(x)[0, 4:] - model(other)[0, 4:]
    assert same.abs().max() == 0  # later documents never see the first
    assert leaks.abs().max() > 1e-3  # plain causal attention does
    mask = document_causal_mask(x, eot)[0, 0]
    assert mask.tril().equal(mask) and mask.diagonal().all()


def test_document_mask_needs_an_end_of_text_token(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["data.document_mask=true", "train.progress=false",
                                             "train.tensorboard=false"])
    with pytest.raises(ConfigError, match="data.document_mask=true needs documents separated"):
        Trainer(cfg, tmp_path)

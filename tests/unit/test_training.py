"""Training with every constraint method keeps every matrix under its cap after every step
(exact SVD), and the certificate bounds the network's empirical Lipschitz constant."""

import math

import pytest
import torch

from distlip.config import load_config
from distlip.lipschitz.caps import CAPPED_METHODS
from distlip.lipschitz.certificate import CAP_RTOL, certify, embed_rms_max, exact_norms
from distlip.optim import lr_at, momentum_at

from helpers.trainers import SMOKE, make_trainer


def max_token_rms(t: torch.Tensor) -> torch.Tensor:
    """(B, T, d) → (B,): the max over tokens of the per-token RMS."""
    return t.pow(2).mean(-1).sqrt().amax(-1)


def empirical_lipschitz(model, d: int, trials: int = 64, ascent: int = 15) -> float:
    """max ‖f(x)−f(y)‖/‖x−y‖ over random nearby embeddings (per-token RMS ≤ 1), sharpened by
    a few steps of gradient ascent on the ratio."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(trials, 8, d, generator=g)
    x = 0.9 * x / x.pow(2).mean(-1, keepdim=True).sqrt()
    delta = (1e-3 * torch.randn(trials, 8, d, generator=g)).requires_grad_(True)
    best = 0.0
    for _ in range(ascent):
        change = model.logits_from_embeddings(x + delta) - model.logits_from_embeddings(x)
        ratio = max_token_rms(change) / max_token_rms(delta)
        best = max(best, ratio.max().item())
        (grad,) = torch.autograd.grad(ratio.sum(), delta)
        with torch.no_grad():
            delta += 1e-4 * grad / grad.norm(dim=(1, 2), keepdim=True)
            delta.mul_(1e-3 / max_token_rms(delta)[:, None, None])  # stay local and inside the RMS-1 ball
    return best


@pytest.mark.parametrize("method, extra", [
    ("soft_cap", []), ("hard_cap", []), ("spectral_normalize", []), ("stiefel", []), ("exact_cap", []),
    ("spectral_hammer", []), ("spectral_weight_decay", ["constraint.spectral_wd=0.1"]),
    ("weight_decay", ["constraint.weight_decay=0.5"]), ("none", []),
    ("soft_cap", ["optim.name=adamw", "optim.lr=0.01"]),
])
def test_every_step_obeys_the_cap_and_the_certificate_bounds_the_network(tmp_path, method, extra):
    trainer = make_trainer(tmp_path, f"constraint.method={method}", "constraint.sigma_max=1.5", "optim.lr=0.3", *extra)
    mats = lambda: {n: trainer.params[n].data for n in trainer.matrices}  # noqa: E731
    for _ in range(6):
        loss, _ = trainer.train_step()
        assert math.isfinite(loss)
        norms = exact_norms(mats())
        if method in CAPPED_METHODS:
            worst = max(norms.values())
            assert worst <= 1.5 * (1 + CAP_RTOL), f"{method}: ‖W‖ = {worst} after step {trainer.step}"
        assert embed_rms_max(trainer.params["embed.weight"].data) <= 1 + 1e-6
    assert any(v > 0.05 for n, v in norms.items() if n.endswith("attn.o.weight")), "training did not move W_o"
    cert = certify(norms, embed_rms_max(trainer.params["embed.weight"].data), trainer.cfg.model, trainer.caps)
    measured = empirical_lipschitz(trainer.model, trainer.cfg.model.d_model)
    assert measured > 0
    assert cert.network_bound >= measured, f"{method}: bound {cert.network_bound} < measured {measured}"


def test_certificate_with_attention_scale_bounds_the_network(tmp_path):
    trainer = make_trainer(tmp_path, "model.attn_scale=4", "constraint.sigma_max=2", "optim.lr=0.5")
    for _ in range(8):
        trainer.train_step()
    norms = exact_norms({n: trainer.params[n].data for n in trainer.matrices})
    cert = certify(norms, 1.0, trainer.cfg.model)
    assert cert.network_bound >= empirical_lipschitz(trainer.model, trainer.cfg.model.d_model)


def test_certificate_grows_with_attention_scale_only_through_the_qk_term():
    from distlip.config import ModelConfig
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2)
    keys = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc_in", "mlp.fc_out")
    names = [f"blocks.{i}.{k}.weight" for i in range(2) for k in keys]
    norms = {n: 1.0 for n in names} | {"head.weight": 1.0}
    one = certify(norms, 1.0, cfg)
    many = certify(norms, 1.0, ModelConfig(**{**cfg.__dict__, "attn_scale": 24.0}))
    assert many.bound > one.bound
    sharp = ModelConfig(**{**cfg.__dict__, "attn_scale": 24.0})
    zero_qk = certify({**norms, **{n: 0.0 for n in names if ".q." in n}}, 1.0, sharp)
    no_qk = certify({**norms, **{n: 0.0 for n in names if ".q." in n}}, 1.0, cfg)
    assert zero_qk.bound == pytest.approx(no_qk.bound)


def test_per_step_estimate_tracks_the_exact_norms(tmp_path):
    trainer = make_trainer(tmp_path, "train.steps=6")
    for _ in range(6):
        trainer.train_step()
    est = trainer.certificate(exact=False)
    exact = trainer.certificate(exact=True)
    for n in trainer.matrices:
        assert est.norms[n] <= exact.norms[n] * (1 + 1e-6)  # power iteration approaches from below
        assert est.norms[n] >= 0.9 * exact.norms[n]
    assert exact.bound >= est.bound * (1 - 1e-6)


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    from distlip.errors import DistlipError
    trainer = make_trainer(tmp_path)
    with torch.no_grad():
        trainer.params["embed.weight"].fill_(float("nan"))
    with pytest.raises(DistlipError, match="diverged"):
        trainer.train_step()


@pytest.mark.parametrize("capped, shown", [(True, "max ‖W‖/cap 0.9990"), (False, "no caps")])
def test_final_line_names_the_caps_only_when_there_are_caps(tmp_path, capsys, capped, shown):
    from distlip.cli import print_summary
    summary = {"val_loss": 1.5, "val_acc": 0.5, "lipschitz_bound": 12.0, "certified": True,
               "max_cap_ratio": 0.999 if capped else 0.0, "capped": capped, "train_seconds": 3.0}
    print_summary(summary, tmp_path)
    line = capsys.readouterr().out.splitlines()[0]
    assert f"(certified, exact SVD; {shown})" in line and ("‖W‖/cap" in line) == capped


def test_schedules():
    cfg = load_config(SMOKE, ["optim.decay_start=0.6", "optim.final_lr_frac=0.1", "optim.lr=1",
                              "constraint.method=hard_cap",
                              "optim.momentum_start=0.85", "optim.momentum=0.95", "optim.momentum_warmup=300"]).optim
    assert lr_at(cfg, 0, 101) == 1.0 and lr_at(cfg, 60, 101) == 1.0
    assert lr_at(cfg, 100, 101) == pytest.approx(0.1)
    assert lr_at(cfg, 80, 101) == pytest.approx(0.55)
    assert momentum_at(cfg, 0) == 0.85 and momentum_at(cfg, 150) == pytest.approx(0.9) and momentum_at(cfg, 300) == 0.95


def test_a_loss_temperature_is_a_larger_head_in_disguise(tmp_path):
    """Cross-entropy of τ·logits with the head's cap and rate divided by τ trains the same
    function as the plain loss with the larger head, step for step: the predictions are those of
    the larger head and the certified bound is τ times smaller. This is why a bound alone says
    nothing of accuracy (docs/frontier.md, "The logits' scale")."""
    tau = 10.0
    common = ["constraint.method=exact_cap", "constraint.sigma_max=1.5", "optim.lr=0.3", "model.n_layers=1"]
    plain = make_trainer(tmp_path / "plain", *common, "constraint.caps={embed: 1, head: 4}")
    head_rate = plain.cfg.optim.lr_mult["head"]
    tempered = make_trainer(tmp_path / "tempered", *common, f"constraint.caps={{embed: 1, head: {4 / tau}}}",
                            f"train.loss_temperature={tau}", f"optim.lr_mult.head={head_rate / tau}")
    for _ in range(8):
        loss_plain, _ = plain.train_step()
        loss_tempered, _ = tempered.train_step()
        assert loss_tempered == pytest.approx(loss_plain, rel=1e-4)
    x, _ = plain.data.train.next_batch()
    with torch.no_grad():
        big, small = plain.model(x), tempered.model(x)
    assert torch.allclose(small * tau, big, rtol=1e-3, atol=1e-4)
    assert torch.equal(small.argmax(-1), big.argmax(-1))
    assert plain.model.head.weight.abs().max() > 0.05, "the head did not train"
    b_plain, b_tempered = plain.certificate(exact=True).bound, tempered.certificate(exact=True).bound
    assert b_tempered == pytest.approx(b_plain / tau, rel=1e-4)


def test_dropout_acts_in_training_only_and_the_saved_model_is_the_certified_map(tmp_path):
    """`model.dropout` perturbs training steps; the model read back from a checkpoint is in eval
    mode, deterministic, equal to the trainer's model in eval mode, and under its certificate."""
    from distlip.checkpoint.state import open_model
    trainer = make_trainer(tmp_path, "model.dropout=0.3", "constraint.method=exact_cap", "constraint.sigma_max=1.5",
                           "optim.lr=0.3")
    for _ in range(4):
        assert math.isfinite(trainer.train_step()[0])
    x, _ = trainer.data.train.next_batch()
    with torch.no_grad():
        assert not torch.equal(trainer.model(x), trainer.model(x)), "dropout drew nothing in training mode"
        trainer.save()
        model, cfg, _, _ = open_model(tmp_path)
        assert cfg.model.dropout == 0.3 and not model.training
        once, again = model(x), model(x)
        assert torch.equal(once, again)
        torch.testing.assert_close(once, trainer.model.eval()(x))
    bound = trainer.certificate(exact=True).bound
    assert empirical_lipschitz(model, cfg.model.d_model) <= bound


def test_loss_temperature_must_be_positive():
    from distlip.errors import ConfigError
    with pytest.raises(ConfigError, match="train.loss_temperature=0"):
        load_config(SMOKE, ["train.loss_temperature=0"])

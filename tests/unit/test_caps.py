"""Per-group caps and the target bound: every group's cap holds after every step, a target bound
holds after every step for every capping method (exact SVD certificate), and bad settings are
refused in one line."""

import pytest
import torch

from distlip.config import load_config
from distlip.config.choices import GROUPS
from distlip.errors import ConfigError
from distlip.lipschitz.budget import allocate, bound_at_caps, soft_cap_floors
from distlip.lipschitz.caps import CAPPED_METHODS, constraint_summary, group_caps, group_of
from distlip.lipschitz.certificate import CAP_RTOL, certify_weights, exact_norms
from distlip.model import block_key
from distlip.preflight import check_config
from distlip.trainer import Trainer

SMOKE = "configs/smoke.yaml"
FAST = ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_heads=4",
        "model.context=16", "train.batch_size=4", "train.eval_every=0", "optim.lr=0.3"]


def make_trainer(tmp_path, *overrides) -> Trainer:
    torch.set_num_threads(1)
    return Trainer(load_config(SMOKE, [*FAST, *overrides]), tmp_path)


def weights(trainer) -> dict:
    return {n: p.data for n, p in trainer.params.items()}


def test_every_group_keeps_its_own_cap_after_every_step(tmp_path):
    caps = {"embed": 0.8, "qk": 2.0, "v": 0.7, "o": 1.3, "mlp_in": 0.9, "mlp_out": 1.1, "head": 0.6}
    trainer = make_trainer(tmp_path, "constraint.method=hard_cap", f"constraint.caps={caps}".replace("'", ""))
    assert group_caps(trainer.cfg.constraint) == caps
    H = trainer.cfg.model.n_heads
    for _ in range(4):
        trainer.train_step()
        norms = exact_norms({n: trainer.params[n].data for n in trainer.matrices}, H)
        for key, value in norms.items():
            name = key.split("[")[0]
            assert value <= caps[group_of(name)] * (1 + CAP_RTOL), f"{key}: {value} > {caps[group_of(name)]}"
        rms = trainer.params["embed.weight"].data.pow(2).mean(1).sqrt().max().item()
        assert rms <= caps["embed"] * (1 + 1e-6)
    # the caps that bind: W_q blocks can reach 2.0, far above the v group's 0.7
    assert max(norms[block_key("blocks.0.attn.q.weight", h)] for h in range(H)) > 0.7


@pytest.mark.parametrize("method", CAPPED_METHODS)
def test_target_bound_holds_after_every_step(tmp_path, method):
    B = 3.0
    trainer = make_trainer(tmp_path, f"constraint.method={method}", f"constraint.target_bound={B}",
                           "constraint.caps={qk: 2.0, head: 0.5}")
    caps = group_caps(trainer.cfg.constraint)
    assert caps["qk"] / caps["v"] == pytest.approx(2.0 / trainer.cfg.constraint.sigma_max)  # ratios kept
    assert bound_at_caps(caps, trainer.cfg.model) == pytest.approx(B, rel=1e-6)
    bounds = []
    for _ in range(5):
        trainer.train_step()
        cert, unit = certify_weights(weights(trainer), trainer.cfg)
        assert not cert.violations(unit)
        bounds.append(cert.bound)
        assert cert.bound <= B * (1 + 1e-6), f"{method}: certificate {cert.bound} > target {B}"
    assert max(bounds) > 0.01 * B  # the weights moved: the assertion could fail


def test_impossible_target_is_refused_with_the_smallest_feasible_bound():
    base = ["constraint.method=soft_cap", "optim.lr=0.5", "constraint.sigma_max=5"]
    cfg = load_config(SMOKE, base)
    floors = soft_cap_floors(cfg)
    smallest = bound_at_caps({"embed": 1.0, **floors}, cfg.model)
    with pytest.raises(ConfigError, match=r"cannot be met") as err:
        check_config(load_config(SMOKE, [*base, f"constraint.target_bound={smallest * 0.9}"]))
    message = str(err.value)
    assert "\n" not in message and f"{smallest:.6g}" in message
    # at (just above) that bound the target is met, with every group at its floor
    ok = load_config(SMOKE, [*base, f"constraint.target_bound={smallest * (1 + 1e-9)}"])
    check_config(ok)
    assert allocate(ok) == pytest.approx({"embed": 1.0, **floors}, rel=1e-6)


@pytest.mark.parametrize("method, extra", [("weight_decay", ["constraint.weight_decay=0.1"]),
                                           ("spectral_weight_decay", ["constraint.spectral_wd=0.1"]),
                                           ("spectral_hammer", []), ("none", [])])
def test_target_bound_with_a_method_that_gives_no_guarantee_is_refused(method, extra):
    with pytest.raises(ConfigError, match="gives no guarantee"):
        check_config(load_config(SMOKE, [f"constraint.method={method}", "constraint.target_bound=5", *extra]))


def test_target_bound_without_the_embedding_cap_is_refused():
    with pytest.raises(ConfigError, match="needs constraint.embed_cap=true"):
        check_config(load_config(SMOKE, ["constraint.method=hard_cap", "constraint.target_bound=5",
                                         "constraint.embed_cap=false"]))


@pytest.mark.parametrize("caps, pattern", [
    ("{qkv: 1.0}", r"unknown group 'qkv' \(did you mean 'qk'\?\)"),
    ("{mlp_ot: 1.0}", r"did you mean 'mlp_out'"),
    ("{v: 0}", r"constraint.caps.v=0 must be a finite number > 0"),
    ("{head: -1.5}", r"constraint.caps.head=-1.5 must be"),
])
def test_bad_caps_are_refused_in_one_line(caps, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(SMOKE, [f"constraint.caps={caps}"])
    assert "\n" not in str(err.value)


def test_soft_cap_refuses_a_group_cap_below_its_step():
    with pytest.raises(ConfigError, match="qk matrices' Muon step"):
        check_config(load_config(SMOKE, ["constraint.method=soft_cap", "optim.lr=0.5", "constraint.caps={qk: 0.3}"]))


def test_bound_at_caps_increases_in_every_cap_and_whole_matrix_caps_cost_sqrt_heads():
    cfg = load_config(SMOKE, ["model.n_heads=4"]).model
    caps = {g: 1.0 for g in GROUPS}
    base = bound_at_caps(caps, cfg)
    for g in GROUPS:
        assert bound_at_caps({**caps, g: 1.1}, cfg) > base, g
    assert bound_at_caps(caps, cfg, per_head=False) > base


@pytest.mark.parametrize("preset", ["configs/default.yaml", "configs/shakespeare.yaml",
                                    "configs/shakespeare-one-layer.yaml"])
def test_the_certified_presets_reach_their_target_with_the_shape_of_their_caps(preset):
    """The presets with a target bound (certified ≤ 100, the Shakespeare recipes ≤ 10): the
    allocation scales the caps table by one factor to a certificate at caps just under the target
    (so every step of the run is certified within it)."""
    cfg = load_config(preset, ["model.vocab_size=65"])
    caps = allocate(cfg)
    assert 0.99 * cfg.constraint.target_bound <= bound_at_caps(caps, cfg.model) <= cfg.constraint.target_bound
    factors = {g: caps[g] / cfg.constraint.caps[g] for g in GROUPS if g != "embed"}
    assert max(factors.values()) == pytest.approx(min(factors.values()), rel=1e-12), factors
    assert caps["embed"] == cfg.constraint.caps["embed"]


def test_saved_configs_from_before_per_group_caps_load_as_whole_matrix_caps():
    from distlip.config import config_from_dict
    data = load_config(SMOKE).to_dict()
    c = data["constraint"]
    for key in ("caps", "per_head", "target_bound"):
        c.pop(key)
    c["head_sigma_max"] = 0.5
    cfg = config_from_dict(data)
    assert cfg.constraint.per_head is False and group_caps(cfg.constraint)["head"] == 0.5


def test_certify_prints_group_caps_and_a_row_per_head_block(tmp_path, capsys):
    from distlip.checkpoint.export import save_model
    from distlip.cli import main as cli
    trainer = make_trainer(tmp_path / "run", "constraint.method=hard_cap", "constraint.caps={qk: 1.5, head: 0.5}")
    trainer.train_step()
    save_model(tmp_path / "model", weights(trainer), trainer.cfg, trainer.data.tokenizer)
    assert cli(["certify", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "caps: embed 1  qk 1.5  v 1  o 1  mlp_in 1  mlp_out 1  head 0.5  (per head: yes)" in out
    for h in range(4):
        assert f"blocks.1.attn.k.weight[{h}]" in out
    cert, _ = certify_weights(weights(trainer), trainer.cfg)
    assert out.splitlines()[-1] == f"lipschitz_bound: {cert.bound:.6g}"


def test_attacks_never_beat_a_target_bound_model(tmp_path):
    from distlip.lipschitz.attack import jacobian_attack, pair_attack
    trainer = make_trainer(tmp_path, "constraint.method=hard_cap", "constraint.target_bound=2", "optim.lr=1.0",
                           "optim.lr_mult={embed: 0.5, head: 1.0, qkv: 1.0, out: 1.0, mlp: 1.0}")
    for _ in range(8):
        trainer.train_step()
    cert, _ = certify_weights(weights(trainer), trainer.cfg)
    model = trainer.model.double()
    f = lambda h: model.head(model.hidden(h))  # noqa: E731  embeddings → logits, float64
    x = model.embed(trainer.data.val_x[:4]).detach()
    found = max(jacobian_attack(f, x, iters=15), pair_attack(f, x * 0.8, 0.2, steps=20, restarts=2))
    assert cert.bound <= 2 * (1 + 1e-6)
    assert 0.01 < found <= cert.network_bound, f"attack {found} vs certificate {cert.network_bound}"


def test_the_start_up_line_says_where_the_caps_come_from():
    """A target bound is named as such (its caps are chosen, sigma_max is not used); explicit caps
    are listed per group; a method that caps nothing has no σmax to show."""
    target = load_config("configs/default.yaml").constraint
    assert constraint_summary(target) == "exact_cap, caps chosen for a certified bound ≤ 100"
    soft = load_config("configs/soft-cap.yaml").constraint
    assert constraint_summary(soft) == "soft_cap σmax=3"
    explicit = load_config("configs/smoke.yaml", ["constraint.method=hard_cap", "constraint.caps={qk: 2}"]).constraint
    assert constraint_summary(explicit).startswith("hard_cap, per-group caps embed 1  qk 2  v ")
    assert constraint_summary(load_config("configs/smoke.yaml", ["constraint.method=none"]).constraint) == "none"


def test_the_shakespeare_recipe_is_the_two_layer_model_at_a_larger_bound_scaled_down_by_its_temperature():
    """`configs/shakespeare.yaml` is the one-layer recipe with two layers certified ≤ bound·τ, trained
    on τ·logits with the head's cap and rate divided by τ: the same training up to the factor τ on
    the logits (docs/frontier.md, the logits' scale), every other setting equal."""
    recipe = load_config("configs/shakespeare.yaml", ["model.vocab_size=65"])
    tau, bound = recipe.train.loss_temperature, recipe.constraint.target_bound
    assert tau > 1
    plain = load_config("configs/shakespeare-one-layer.yaml", [
        "model.vocab_size=65", "model.n_layers=2", f"constraint.target_bound={bound * tau}",
        f"optim.lr={recipe.optim.lr}"])
    small, large = allocate(recipe), allocate(plain)
    for g in GROUPS:
        assert small[g] == pytest.approx(large[g] / (tau if g == "head" else 1), rel=1e-9), g
    assert bound_at_caps(small, recipe.model) == pytest.approx(bound_at_caps(large, plain.model) / tau, rel=1e-9)
    a, b = recipe.to_dict(), plain.to_dict()
    assert a["optim"]["lr_mult"].pop("head") == pytest.approx(b["optim"]["lr_mult"].pop("head") / tau)
    for d in (a, b):
        d["constraint"].pop("caps"), d["constraint"].pop("target_bound")
        d["train"].pop("loss_temperature"), d["train"].pop("out")
    assert a == b

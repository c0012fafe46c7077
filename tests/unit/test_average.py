"""train.average_last: the final model is the mean of the weights at the run's last checkpoints,
certified, evaluated and exported as such; refused at start-up when the checkpoints it needs
would not be there."""

import json

import pytest
import torch
from safetensors.torch import load_file

from distlip.checkpoint.average import average_checkpoints, averaged_steps
from distlip.checkpoint.files import CheckpointWarning
from distlip.checkpoint.state import read_checkpoint
from distlip.cli import main as cli
from distlip.config import load_config
from distlip.errors import ConfigError
from distlip.lipschitz.certificate import certify_weights
from distlip.lipschitz.constraints import embed_cap

SMOKE = "configs/smoke.yaml"
FAST = ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_heads=2", "model.context=16",
        "train.batch_size=8", "train.eval_every=0", "train.log_every=1", "train.steps=10"]


@pytest.mark.parametrize("steps, every, k, expected", [
    (2000, 100, 6, [1500, 1600, 1700, 1800, 1900, 2000]),
    (2050, 100, 3, [1900, 2000, 2050]),  # the last step is kept whether or not it is a multiple
    (10, 3, 4, [3, 6, 9, 10]),
    (10, 3, 1, [10]),
])
def test_averaged_steps_are_the_last_step_and_the_newest_multiples_below_it(steps, every, k, expected):
    assert averaged_steps(steps, every, k) == expected


@pytest.mark.parametrize("overrides, says", [
    (["train.average_last=0"], "must be ≥ 1"),
    (["train.average_last=3"], "train.save_every=0 writes one at the end only"),
    (["train.average_last=4", "train.save_every=2", "train.keep_last=3"], "set train.keep_last ≥ 4"),
    (["train.average_last=6", "train.save_every=2", "train.keep_last=6"], "reaches back past step 0"),
])
def test_an_average_the_run_could_not_take_is_refused_at_start_up(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(SMOKE, [*FAST, *overrides])


def test_the_largest_average_that_fits_is_accepted():
    # steps 2, 4, 6, 8 and 10: five checkpoints below and at train.steps=10
    assert load_config(SMOKE, [*FAST, "train.average_last=5", "train.save_every=2", "train.keep_last=5"])


def test_a_mean_of_capped_weights_stays_inside_the_caps():
    # why averaging keeps the certificate: every cap is a convex ball
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(24, 16, generator=g) for _ in range(5)]
    capped = [m * (1.5 / torch.linalg.matrix_norm(m, 2)) for m in mats]  # σmax exactly 1.5
    assert torch.linalg.matrix_norm(sum(capped) / 5, 2) <= 1.5 * (1 + 1e-6)
    rows = [embed_cap(torch.randn(30, 16, generator=g) * 3, 1.0) for _ in range(5)]
    assert (sum(rows) / 5).pow(2).mean(dim=1).sqrt().max() <= 1 + 1e-6


def test_the_exported_model_is_the_mean_of_the_last_checkpoints_and_is_certified(tmp_path, capsys):
    args = ["train", "--config", SMOKE, "--out", str(tmp_path), *FAST, "constraint.method=exact_cap",
            "train.save_every=3", "train.keep_last=3", "train.average_last=3"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "the mean of the weights at 3 checkpoints (steps 6…10)" in out
    steps = [6, 9, 10]
    ckpts = [read_checkpoint(tmp_path / f"step_{s:06d}")[0] for s in steps]
    exported = load_file(tmp_path / "model.safetensors")
    for name, w in exported.items():
        mean = sum(c[name].double() for c in ckpts) / 3
        assert torch.allclose(w.double(), mean, atol=1e-6), name
    assert any(not torch.equal(w, ckpts[-1][name]) for name, w in exported.items())  # not the last step's
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["averaged_steps"] == steps
    cfg = load_config(SMOKE, [*FAST, "constraint.method=exact_cap"])
    cert, caps = certify_weights(exported, cfg)
    assert not cert.violations(caps)
    assert meta["certificate"]["lipschitz_bound"] == pytest.approx(cert.bound, rel=1e-9)
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["event"] == "final" and final["averaged_steps"] == steps and final["certified"]
    assert final["lipschitz_bound"] == pytest.approx(cert.bound, rel=1e-9)
    assert {"last_val_acc", "last_val_loss", "last_lipschitz_bound"} <= set(final)
    # the checkpoints keep the trained state: resuming continues from the last step, not the mean
    assert not torch.equal(read_checkpoint(tmp_path)[0]["head.weight"], exported["head.weight"])
    # a checkpoint that is gone (rotated out by keep_last here) is left out of the mean, with a warning
    with pytest.warns(CheckpointWarning, match="steps 6, 9, 10: those of steps 3 were rotated out"):
        mean, found = average_checkpoints(tmp_path, [3, 6, 9, 10])
    assert found == steps and all(torch.allclose(mean[n], exported[n], atol=1e-6) for n in exported)

"""Config loading: presets, dotted overrides, and one-line errors for bad input."""

import re

import pytest

from distlip.config import load_config
from distlip.errors import ConfigError
from distlip.preflight import check_config

from helpers import ROOT

CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_preset_loads(preset):
    check_config(load_config(CONFIGS / preset))


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.steps=7", "constraint.sigma_max=2", "optim.betas=[0.8, 0.9]",
                                               "optim.lr_mult={head: 0.2}"])
    assert cfg.train.steps == 7 and cfg.constraint.sigma_max == 2.0 and isinstance(cfg.constraint.sigma_max, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.lr_mult["head"] == 0.2 and cfg.optim.lr_mult["qkv"] == 0.9  # merged with defaults


@pytest.mark.parametrize("override, fragment", [
    (["train.stpes=3"], "did you mean 'steps'"),
    (["constraint.method=soft_capp"], "soft_cap"),
    (["constraint.sigma_max=0"], "sigma_max"),
    (["constraint.sigma_max=-1"], "must be > 0"),
    (["train.steps=abc"], "expected int"),
    (["model.n_heads=3"], "not divisible"),
    (["dist.zero_stage=4"], "ZeRO stage"),
    (["data.source=text"], "data.path"),
    (["trainn.steps=3"], "did you mean 'train'"),
    (["train.steps"], "section.key=value"),
    (["optim.lr=1.0", "constraint.sigma_max=2"], "lower optim.lr to"),
    (["data.seq_len=64"], "data.seq_len=64 is longer than model.context=32"),
    (["model.lookback=[1, 2, 3]"], "at most model.n_heads=2"),
    (["model.lookback=[1, 40]"], "each in [0, model.context=32)"),
    (["model.lookback=[1]", "model.lookback_bias=0"], "positive finite score"),
    (["model.lookback=[1]", "train.attention=flex"], "set train.attention=sdpa or drop model.lookback"),
    (["model.dropout=1"], "model.dropout=1.0 must be a probability in [0, 1)"),
    (["train.teacher_weight=0"], "train.teacher_weight=0.0 must be in (0, 1]"),
    (["train.teacher_weight=1.5"], "train.teacher_weight=1.5 must be in (0, 1]"),
    (["train.teacher=configs", "data.source=jsonl", "data.path=x.jsonl", "data.val_tokens=100"],
     "train.teacher needs the in-memory character corpora"),
    (["train.teacher=no/such/run"], "train.teacher 'no/such/run' does not exist"),
])
def test_bad_config_is_one_clear_error(override, fragment):
    with pytest.raises(ConfigError) as err:  # at load, or in the preflight's config checks
        check_config(load_config(CONFIGS / "smoke.yaml", override))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_the_soft_cap_limit_quoted_in_a_refusal_is_accepted(sigma):
    over = [f"constraint.sigma_max={sigma}", "optim.lr=5"]
    with pytest.raises(ConfigError) as err:
        check_config(load_config(CONFIGS / "smoke.yaml", over))
    limit = re.search(r"lower optim.lr to ≤ ([0-9.]+)", str(err.value)).group(1)
    check_config(load_config(CONFIGS / "smoke.yaml", [*over, f"optim.lr={limit}"]))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_bad_data_files_are_one_line_errors(tmp_path):
    import subprocess
    import sys
    empty, binary = tmp_path / "empty.txt", tmp_path / "bin.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")
    for path, fragment in ((empty, "is empty"), (binary, "not UTF-8"), (tmp_path / "missing.txt", "not found")):
        proc = subprocess.run([sys.executable, "-m", "distlip", "train", "--config", "configs/smoke.yaml",
                               "--out", str(tmp_path / "run"), "data.source=text", f"data.path={path}"],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: ") and fragment in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1

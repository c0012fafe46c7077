"""Every number a user types is read: the float and integer spellings of overrides and YAML files
(which YAML 1.1 reads partly as strings, or as octal), and real garbage refused in one line."""

import math

import pytest

from distlip.config import load_config
from distlip.errors import ConfigError

FLOATS = [
    ("3e-4", 3e-4), ("1E-3", 1e-3), ("1.0e9", 1.0e9), ("1.0E+9", 1.0e9), (".5", 0.5), ("5.", 5.0), ("0.1", 0.1),
    ("1_000", 1000.0), ("1_000.5", 1000.5), ("-2e-3", -2e-3), ("+1.5", 1.5), ("2", 2.0), ("1e3", 1000.0),
    ("6.0e-05", 6e-5), ("0", 0.0), ("+.25e1", 2.5), ("1e1_0", 1e10),
]  # fmt: skip
INTS = [
    ("20", 20), ("1_000", 1000), ("010", 10), ("1e3", 1000), ("2.0e+3", 2000), ("+7", 7), ("0x10", 16), ("1E2", 100),
]  # fmt: skip
GARBAGE = ["3e-4x", "1e", "..5", "1.2.3", "e5", "1,5", "0.1.", "abc", "nan", "1:30", "--1", "1e-", "[0.1]", "true"]


# optim.eps is a float that validation leaves alone, so every value of the table is accepted.
@pytest.mark.parametrize("text, value", FLOATS)
def test_float_override_spellings(text, value):
    assert load_config(None, [f"optim.eps={text}"]).optim.eps == value


@pytest.mark.parametrize("text, value", FLOATS)
def test_float_yaml_spellings(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  eps: {text}\n  betas: [{text}, 0.95]\n  lr_mult: {{embed: {text}}}\n")
    cfg = load_config(path)
    assert cfg.optim.eps == value and cfg.optim.betas == (value, 0.95) and cfg.optim.lr_mult["embed"] == value


def test_the_commands_users_typed():
    assert load_config("configs/smoke.yaml", ["optim.lr=3e-4"]).optim.lr == 3e-4
    assert load_config("configs/smoke.yaml", ["optim.lr=1.0e9", "constraint.method=hard_cap"]).optim.lr == 1.0e9


@pytest.mark.parametrize("text, value", INTS)
def test_integer_spellings(tmp_path, text, value):
    assert load_config(None, [f"train.steps={text}"]).train.steps == value
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  steps: {text}\n")
    assert load_config(path).train.steps == value


@pytest.mark.parametrize("text", GARBAGE)
def test_garbage_is_refused_in_one_line_naming_the_key(tmp_path, text):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"optim.eps={text}"])
    message = str(err.value)
    assert message.startswith("optim.eps: expected float, got ") and "\n" not in message
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  eps: {text}\n")
    with pytest.raises(ConfigError, match=r"^optim\.eps: expected float, got "):
        load_config(path)


@pytest.mark.parametrize("text", ["2.5", "1e-3", "1.5e0", "abc", "true"])
def test_fractions_and_words_are_not_integers(text):
    with pytest.raises(ConfigError, match=r"^train\.steps: expected int, got "):
        load_config(None, [f"train.steps={text}"])


def test_other_values_read_as_before():
    cfg = load_config(None, ["train.tensorboard=off", "train.out=runs/1e3", "model.rotary_base=.inf"])
    assert cfg.train.tensorboard is False and cfg.train.out == "runs/1e3" and math.isinf(cfg.model.rotary_base)


def test_cli_refuses_garbage_with_one_line_and_status_2(capsys):
    from distlip.cli import main

    assert main(["train", "--config", "configs/smoke.yaml", "optim.lr=3e-4x"]) == 2
    err = capsys.readouterr().err
    assert err == "error: optim.lr: expected float, got '3e-4x'\n"

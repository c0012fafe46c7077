"""Loading the configuration: YAML presets in `configs/`, dotted overrides from the command line.

`load_config(path, overrides)` reads a YAML file, applies `section.key=value` overrides,
builds the nested dataclasses and validates them, so every mistake is reported at start-up
as one `ConfigError` line that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from distlip.config.checks import validate
from distlip.config.schema import Config
from distlip.errors import ConfigError, did_you_mean

# YAML 1.1, which PyYAML implements, reads `3e-4` and `1.0e9` as strings (its floats need a dot
# and a signed exponent) and `010` as octal 8. Config files and overrides are read with the
# number forms people write instead: decimal integers (leading zeros are decimal), 0x/0o/0b
# integers, and floats with or without a dot or exponent sign (`3e-4`, `1E-3`, `.5`, `5.`,
# `+1.5`); `_` may group digits (`1_000`). Everything else resolves as before.
_INT = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0[xX][0-9a-fA-F][0-9a-fA-F_]*|0[oO][0-7][0-7_]*|0[bB][01][01_]*)$")
_FLOAT = re.compile(
    r"^[-+]?(?:(?:[0-9][0-9_]*)?\.[0-9][0-9_]*|[0-9][0-9_]*\.?)(?:[eE][-+]?[0-9][0-9_]*)?$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _NumberLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with the number forms above."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0x": 16, "0o": 8, "0b": 2}.get(digits[:2].lower(), 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


_NumberLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_NumberLoader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
_NumberLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))
_NumberLoader.add_constructor(_INT_TAG, _construct_int)


def read_yaml(text: str) -> Any:
    """Parse YAML text with the number forms above (`yaml.safe_load` otherwise)."""
    return yaml.load(text, Loader=_NumberLoader)  # noqa: S506 - a SafeLoader subclass


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the dataclass field's type, or raise ConfigError."""
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # A whole number written as a float (`train.steps=1e4`) is an integer.
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if typ is dict and isinstance(value, dict):
        return dict(value)
    arms = get_args(typ)
    if type(None) in arms:  # `X | None`: None, or a value of X
        return None if value is None else _coerce(value, next(a for a in arms if a is not type(None)), key)
    base = get_origin(typ) or typ
    if isinstance(base, type) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{did_you_mean(key, names)}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, typ, full)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """CLI override values are YAML scalars: 0.1, 3e-4, true, [0.9, 0.95], {embed: 0.1}, text."""
    return read_yaml(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.steps=20")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
        node[parts[-1]] = _parse_value(text)
    return data


def _check_fields(cls, data: dict, prefix: str = "") -> None:
    """Reject unknown keys anywhere before defaults are merged (gives the closest name)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{did_you_mean(key, names)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_fields(hints[key], value, f"{prefix}{key}.")


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset, apply overrides, build and validate the Config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "not found"
            raise ConfigError(f"config file '{p}' {what}; presets live in configs/ (e.g. configs/shakespeare.yaml)")
        try:
            data = read_yaml(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(exc).splitlines()[0]}{where}; fix that line "
                              "(configs/smoke.yaml shows the layout)") from None
    apply_overrides(data, overrides or [])
    _check_fields(Config, data)
    defaults = Config().to_dict()
    cfg = _build(Config, _merge(defaults, data), "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with `to_dict` (e.g. a run's config.json). Configs saved before
    per-group caps (`head_sigma_max`, no `per_head`) load as what they were: whole-matrix caps."""
    c = data.get("constraint")
    if isinstance(c, dict) and "per_head" not in c:
        head = c.pop("head_sigma_max", 0.0)
        data = {**data, "constraint": {**c, "per_head": False, **({"caps": {"head": head}} if head else {})}}
    _check_fields(Config, data)
    cfg = _build(Config, _merge(Config().to_dict(), data), "")
    validate(cfg)
    return cfg

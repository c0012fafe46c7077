"""Trained models on disk: DIR/model.safetensors (names as in the model) + DIR/config.json.

config.json holds the full run config, the resolved model sizes, the tokenizer and the cap of
every certified unit (matrix, or head block of W_q/W_k/W_v), which is enough to rebuild the model
and certify it with no other file.
Loading never unpickles: safetensors for tensors, JSON for the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distlip.checkpoint.files import atomic_write
from distlip.config import Config, config_from_dict
from distlip.data.tokenizers import tokenizer_from_dict
from distlip.errors import CheckpointError
from distlip.lipschitz.caps import unit_caps
from distlip.model import LipschitzTransformer

FORMAT = 1  # config.json's "format"; files without one predate the marker and read as 1
ENSEMBLE_FILE = "ensemble.json"  # marks a directory of exported members (`distlip.ensemble`)
_REEXPORT = "export it again from its checkpoint with this version's `distlip export CHECKPOINT DIR`"


def save_model(out_dir: Path, weights: dict[str, torch.Tensor], cfg: Config, tokenizer,
               extra: dict | None = None) -> None:
    """`weights`: full tensors by model parameter name (gathered: no ZeRO shards)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write the model to '{out_dir}' ({exc.strerror}): give a directory path "
                              "that is not a file and not inside one") from None
    tensors = {n: t.detach().float().cpu().contiguous() for n, t in weights.items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    meta = {"format": FORMAT, "config": cfg.to_dict(), "tokenizer": tokenizer.to_dict(),
            "caps": unit_caps(cfg, [n for n in weights if n != "embed.weight"]), **(extra or {})}
    atomic_write(out_dir / "config.json", json.dumps(meta, indent=2))


def load_model(path: str | Path) -> tuple[LipschitzTransformer, Config, object, dict]:
    """A directory with model.safetensors + config.json → (model on CPU in eval mode, config,
    tokenizer, caps)."""
    d = Path(path)
    weights, meta_file = d / "model.safetensors", d / "config.json"
    if not weights.is_file() or not meta_file.is_file():
        raise CheckpointError(f"'{d}' is not an exported model: it needs model.safetensors and config.json as files "
                              "(train with `distlip train` or run `distlip export CHECKPOINT DIR`)")
    try:
        meta = json.loads(meta_file.read_text())
        fmt = meta.get("format", FORMAT)
        if fmt != FORMAT:
            raise CheckpointError(f"format {fmt!r}, this version reads {FORMAT}")
        cfg = config_from_dict(meta["config"])
    except Exception as exc:  # JSON, a missing section, another version's keys: one line, with the fix
        raise CheckpointError(f"'{meta_file}' is not a config.json this distlip version reads "
                              f"({type(exc).__name__}: {exc}): {_REEXPORT}") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own types
        raise CheckpointError(f"cannot read '{weights}' ({type(exc).__name__}: {exc}): the file is damaged; "
                              f"{_REEXPORT}") from None
    model = LipschitzTransformer(cfg.model)
    load_weights(model, state, f"'{weights}'", _REEXPORT)
    return model.eval(), cfg, tokenizer_from_dict(meta["tokenizer"]), meta.get("caps", {})


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Load `state` into `model`, or one CheckpointError naming the names and shapes that differ
    (a model of another size, or a config edited apart from its weights) and `fix`."""
    want = model.state_dict()
    missing = [n for n in want if n not in state]
    unexpected = [n for n in state if n not in want]
    shapes = [f"{n} {tuple(state[n].shape)} vs {tuple(want[n].shape)}"
              for n in want if n in state and state[n].shape != want[n].shape]
    if missing or unexpected or shapes:
        found = [f"{what} {names[:3]}" for what, names in (("missing", missing), ("unexpected", unexpected),
                                                           ("shaped (file vs config)", shapes)) if names]
        raise CheckpointError(f"{where} does not match the model its config describes ({'; '.join(found)}): {fix}")
    model.load_state_dict(state)

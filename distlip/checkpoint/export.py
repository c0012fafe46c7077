"""Trained models on disk: DIR/model.safetensors (names as in the model) + DIR/config.json.

config.json holds the full run config, the resolved model sizes, the tokenizer and the cap of
every certified unit (matrix, or head block of W_q/W_k/W_v), which is enough to rebuild the model and certify it with no other file.
Loading never unpickles: safetensors for tensors, JSON for the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distlip.config import Config, config_from_dict
from distlip.data.tokenizers import tokenizer_from_dict
from distlip.errors import CheckpointError
from distlip.lipschitz.caps import unit_caps
from distlip.model import LipschitzTransformer

def save_model(out_dir: Path, weights: dict[str, torch.Tensor], cfg: Config, tokenizer, extra: dict | None = None) -> None:
    """`weights`: full tensors by model parameter name (gathered: no ZeRO shards)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().float().cpu().contiguous() for n, t in weights.items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    meta = {"config": cfg.to_dict(), "tokenizer": tokenizer.to_dict(),
            "caps": unit_caps(cfg, [n for n in weights if n != "embed.weight"]), **(extra or {})}
    tmp = out_dir / "config.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out_dir / "config.json")


def load_model(path: str | Path) -> tuple[LipschitzTransformer, Config, object, dict]:
    """A directory with model.safetensors + config.json → (model on CPU, config, tokenizer, caps)."""
    d = Path(path)
    weights, meta_file = d / "model.safetensors", d / "config.json"
    if not weights.is_file() or not meta_file.is_file():
        raise CheckpointError(f"'{d}' is not an exported model: it needs model.safetensors and config.json "
                              "(train with `distlip train` or run `distlip export CHECKPOINT DIR`)")
    try:
        meta = json.loads(meta_file.read_text())
        cfg = config_from_dict(meta["config"])
        state = load_file(str(weights))
    except (json.JSONDecodeError, KeyError, OSError, Exception) as exc:  # safetensors raises its own types
        raise CheckpointError(f"cannot read model in '{d}': {type(exc).__name__}: {exc}") from None
    model = LipschitzTransformer(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"'{weights}' does not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model, cfg, tokenizer_from_dict(meta["tokenizer"]), meta.get("caps", {})

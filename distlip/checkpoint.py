"""The whole trainer state in a `CheckpointStore` tag directory, resumable at any world size.

One tag directory (the store seals it with manifest.json; its `meta` holds the run's config
and tokenizer as JSON)::

    step_000400/
      manifest.json
      distlip_rank0.pt ... distlip_rank{W-1}.pt      one per rank, written by that rank

A rank file is a plain dict of tensors (`torch.save`; read with `weights_only=True`, so loading
never unpickles objects)::

    format       FORMAT
    weights      {name: fp32 tensor}   full value of every tensor this rank owns
    momentum     {name: fp32 tensor}   Muon / column-normalised momentum of those tensors
    adam         {name: {"step": 0-dim, "exp_avg", "exp_avg_sq"}}   full Adam state (the embedding
                 under optim.embed=adam, every parameter under the AdamW baseline)
    constraint   {name: (d_in,) fp32}  the constrainer's power-iteration vectors, owned names (head blocks `name[h]`)
    sigma        {name: (d_in,) fp32}  the certificate estimator's vectors, owned names (head blocks `name[h]`)
    data         this rank's data-pipeline state at the step boundary
    rng          {"torch": uint8 tensor, "cuda": uint8 tensor (GPU runs)}
    compression  this rank's compression state (only when the engine has one)

Everything is keyed by parameter name, never by rank or partition, so W ranks' files load on
W' ranks: each rank reads every file (memory-mapped), takes every weight (replicas are full)
and the optimiser state of the names it owns under its own plan. The embedding DeepSpeed holds
is gathered to its full fp32 weight and Adam moments (collectives) and written by rank 0; on
load it goes into whatever holds it now: DeepSpeed's ZeRO 0–3 partitions or the single-process
torch Adam.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distlip.certificate import Certificate, certify_weights
from distlip.checkpoint_store import MANIFEST, Checkpoint, CheckpointStore
from distlip.config import Config, config_from_dict
from distlip.data.tokenizers import tokenizer_from_dict
from distlip.engine import EMBED, DistEnv, uses_deepspeed
from distlip.errors import CheckpointError, ConfigError
from distlip.export import load_model, save_model
from distlip.lipschitz.caps import unit_caps
from distlip.model import LipschitzTransformer, matrix_names, matrix_of
from distlip.zero_state import gather_adam, scatter_adam

if TYPE_CHECKING:
    from distlip.trainer import Trainer

FORMAT = 1
RANK_FILE = "distlip_rank{}.pt"
# Settings a checkpoint's state only fits when they are unchanged (the tokenizer is checked too).
MUST_MATCH = ("optim.name", "optim.embed")


# ---- saving ----------------------------------------------------------------------------------

def save_checkpoint(trainer: Trainer, store: CheckpointStore) -> Path:
    """Collective: every rank writes its file into the tag directory of `trainer.step`; the
    store commits it (manifest, `latest`, rotation). Returns the tag directory."""
    state = _rank_state(trainer)
    path = store.begin(trainer.step)
    torch.save(state, path / RANK_FILE.format(trainer.env.rank))
    meta = {"format": FORMAT, "config": trainer.cfg.to_dict(), "tokenizer": trainer.data.tokenizer.to_dict()}
    return store.commit(trainer.step, meta)


def _rank_state(trainer: Trainer) -> dict:
    engine, rank = trainer.engine, trainer.env.rank
    owned = set(engine.owned)
    optim = engine.optim.state_dict()
    weights = {n: trainer.params[n].data for n in engine.owned}
    adam = {n: s for n, s in optim.get("adam", {}).items() if s}  # empty before the first step
    if engine.ds is not None:  # gathered on every rank (collectives), written by rank 0
        embed, embed_adam = engine.embedding(), gather_adam(engine.ds, trainer.params[EMBED])
        if rank == 0:
            weights[EMBED] = embed
            if embed_adam is not None:
                adam[EMBED] = embed_adam
    rng = {"torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    state = {
        "format": FORMAT,
        "weights": weights,
        "momentum": optim["momentum"],
        "adam": adam,
        "constraint": {n: v for n, v in engine.constrainer.state_dict().items() if matrix_of(n) in owned},
        "sigma": {n: v for n, v in trainer.estimator.state_dict()["vectors"].items() if matrix_of(n) in owned},
        "data": trainer.data.train.state_dict(),
        "rng": rng,
    }
    hooks = _compression_hooks(engine)
    if hooks is not None:
        state["compression"] = hooks[0]()
    return _to_cpu(state)


def _compression_hooks(engine):
    """(save, load) for the engine's compression state (per-rank error-feedback buffers and
    masters), or None for an engine without compression support."""
    save, load = (getattr(engine, n, None) for n in ("compression_state_dict", "load_compression_state_dict"))
    return None if save is None or load is None else (save, load)


def _to_cpu(tree):
    if torch.is_tensor(tree):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


# ---- reading (no process group needed) -----------------------------------------------------

def find_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint directory (with manifest.json), or a run directory's newest good one,
    verified against its manifest."""
    d = Path(path)
    if not (d / MANIFEST).is_file():
        tag = CheckpointStore(d).find_good() if d.is_dir() else None
        if tag is None:
            raise CheckpointError(f"'{d}' is not a checkpoint: give a step_NNNNNN directory (with {MANIFEST}) "
                                  "or a run directory that holds one")
        d = d / tag
    problem = CheckpointStore(d.parent).problem(d)
    if problem is not None:
        raise CheckpointError(f"checkpoint {d} is unusable: {problem}")
    return Checkpoint(d, json.loads((d / MANIFEST).read_text()))


def read_rank_files(ckpt: Checkpoint) -> list[dict]:
    """Every rank's file, index = the rank that wrote it (memory-mapped: tensors are read on use)."""
    files = []
    for rank in range(ckpt.world_size):
        f = ckpt.path / RANK_FILE.format(rank)
        if not f.is_file():
            raise CheckpointError(f"{ckpt.path} has no {f.name}: not a distlip training checkpoint "
                                  f"(written by {ckpt.world_size} ranks)")
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # zip, pickle and weights-only refusals all mean the same here
            raise CheckpointError(f"cannot read {f}: {type(exc).__name__}: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{f} is not a distlip checkpoint file of format {FORMAT}")
        files.append(state)
    return files


def merged_field(files: list[dict], key: str) -> dict:
    """The by-name dicts stored under `key` in every rank file, as one dict (names are unique)."""
    out: dict = {}
    for rank, f in enumerate(files):
        for name, value in f.get(key, {}).items():
            if name in out:
                raise CheckpointError(f"{key} of {name!r} is stored by two ranks (the second is rank {rank}): "
                                      "the checkpoint is inconsistent")
            out[name] = value
    return out


def certified_weights(files: list[dict]) -> dict[str, torch.Tensor]:
    """Every parameter by name: the saved weights, or the owner's master x where a compressed
    downlink kept one (the certified value; the forward copy w only approaches it)."""
    weights = merged_field(files, "weights")
    for comp in (f.get("compression", {}) for f in files):
        weights.update({n: fields["master"] for n, fields in comp.items() if "master" in fields})
    return weights


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, object, Checkpoint]:
    """A checkpoint (or a run directory's newest) → (full weights by name, config, tokenizer, checkpoint)."""
    ckpt = find_checkpoint(path)
    try:
        cfg, tok = config_from_dict(ckpt.meta["config"]), tokenizer_from_dict(ckpt.meta["tokenizer"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path} has no usable config in its manifest: {exc}") from None
    return certified_weights(read_rank_files(ckpt)), cfg, tok, ckpt


def open_model(path: str | Path) -> tuple[LipschitzTransformer, Config, object, dict]:
    """An exported model directory, a checkpoint, or a run directory's newest checkpoint →
    (model on CPU, config, tokenizer, caps), as `export.load_model`."""
    d = Path(path)
    if (d / "model.safetensors").is_file():
        return load_model(d)
    weights, cfg, tok, ckpt = read_checkpoint(d)
    model = LipschitzTransformer(cfg.model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.path} does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model, cfg, tok, unit_caps(cfg, matrix_names(model))


def export_checkpoint(path: str | Path, out_dir: str | Path) -> tuple[Checkpoint, Certificate]:
    """Consolidate a checkpoint into OUT/model.safetensors + OUT/config.json (with its exact
    certificate), loadable by `export.load_model`. Returns (checkpoint, certificate)."""
    weights, cfg, tok, ckpt = read_checkpoint(path)
    cert, _ = certify_weights(weights, cfg)
    save_model(Path(out_dir), weights, cfg, tok, {
        "certificate": {"lipschitz_bound": cert.bound, "log10_bound": cert.log10_bound},
        "checkpoint": {"path": str(ckpt.path), "step": ckpt.step}})
    return ckpt, cert


# ---- loading into a trainer ------------------------------------------------------------------

def check_compatible(ckpt: Checkpoint, cfg: Config, tokenizer) -> None:
    """ConfigError naming every setting in which the checkpoint's run differs from this one
    where its state would not fit: the model's shape, the optimiser kinds, the tokenizer."""
    if "config" not in ckpt.meta or "tokenizer" not in ckpt.meta:
        raise CheckpointError(f"{ckpt.path} was not written by `distlip train`: its manifest has no config/tokenizer")
    old, new = ckpt.meta["config"], cfg.to_dict()
    keys = [f"model.{k}" for k in new["model"]] + list(MUST_MATCH)
    get = lambda d, key: d.get(key.split(".")[0], {}).get(key.split(".")[1])  # noqa: E731
    diffs = [f"{k}={get(old, k)!r} there, {get(new, k)!r} here" for k in keys if get(old, k) != get(new, k)]
    if ckpt.meta["tokenizer"] != tokenizer.to_dict():
        diffs.append(f"tokenizer {ckpt.meta['tokenizer'].get('kind')} there differs from this run's")
    if diffs:
        raise ConfigError(f"checkpoint {ckpt.path} does not fit this run: {'; '.join(diffs)}; "
                          "resume with the checkpoint's settings or start a new run")


def load_checkpoint(trainer: Trainer, ckpt: Checkpoint) -> str:
    """Restore `trainer` (on every rank, after its engine is built) from `ckpt`, whatever world
    size wrote it. Returns one line saying what was restored, re-sharded and reset."""
    check_compatible(ckpt, trainer.cfg, trainer.data.tokenizer)
    files = read_rank_files(ckpt)
    engine, env, params = trainer.engine, trainer.env, trainer.params
    # Module weights: the forward copies w only where this run keeps masters apart (a compressed
    # downlink, restored by _load_compression); otherwise they are what the owners step, so x.
    keeps_masters = bool(engine.exchange is not None and engine.exchange.masters)
    weights = merged_field(files, "weights") if keeps_masters else certified_weights(files)
    for name, p in params.items():
        saved, shape = weights.get(name), tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 may hold p.data empty
        if saved is None or tuple(saved.shape) != shape:
            found = "missing" if saved is None else f"shaped {tuple(saved.shape)}"
            raise CheckpointError(f"{ckpt.path}: {name} is {found}, the model needs {shape}")
    with torch.no_grad():
        for name in matrix_names(trainer.model):
            params[name].data.copy_(weights[name])
        engine.set_embedding(weights[EMBED].to(trainer.device))
    owned = set(engine.owned)
    adam = merged_field(files, "adam")
    engine.optim.load_state_dict({"momentum": merged_field(files, "momentum"), "adam": adam})
    if engine.ds is not None and EMBED in adam:
        scatter_adam(engine.ds, params[EMBED], adam[EMBED])
    engine.constrainer.load_state_dict(
        {n: v for n, v in merged_field(files, "constraint").items() if matrix_of(n) in owned})
    trainer.estimator.load_state_dict(
        {"vectors": {n: v.to(trainer.device) for n, v in merged_field(files, "sigma").items() if matrix_of(n) in owned}})
    same = ckpt.world_size == env.world_size
    mine = files[env.rank] if same else files[0]
    data_state = mine["data"] if same else _common_data_state(files, ckpt, env, trainer.cfg.data.restart_on_resize)
    if data_state is not None:
        trainer.data.train.load_state_dict(data_state)
    torch.set_rng_state(mine["rng"]["torch"])
    if trainer.device.type == "cuda" and "cuda" in mine["rng"]:
        torch.cuda.set_rng_state(mine["rng"]["cuda"], trainer.device)
    reset = _load_compression(trainer, files, same)
    if data_state is None:
        reset.append("the data stream's per-rank position (the stream restarts from its beginning)")
    trainer.step = ckpt.step
    if same:
        return f"resumed from {ckpt.path} at step {ckpt.step}" + (f"; reset: {', '.join(reset)}" if reset else "")
    embed = ""
    if EMBED in adam:
        before = _adam_holder(config_from_dict(ckpt.meta["config"]), ckpt.world_size)
        embed = f", the embedding's Adam state from {before} into {_adam_holder(trainer.cfg, env.world_size)}"
    return (f"resumed from {ckpt.path} at step {ckpt.step} on {env.world_size} rank(s), written by {ckpt.world_size}: "
            f"re-sharded by name the momenta and power-iteration vectors of {len(trainer.matrices)} matrices{embed}; "
            f"{'RNG' if data_state is None else 'data pipeline and RNG'} from rank 0's state; "
            f"reset: {', '.join(reset) or 'nothing'}")


def _adam_holder(cfg: Config, world_size: int) -> str:
    deepspeed = uses_deepspeed(cfg, DistEnv(world_size=world_size))
    return f"DeepSpeed ZeRO-{cfg.dist.zero_stage}" if deepspeed else "torch Adam"


def _common_data_state(files: list[dict], ckpt: Checkpoint, env: DistEnv, restart: bool):
    """The data state at another world size: only one every old rank shares (the in-memory
    source draws the global batch on every rank) can be carried over. A per-rank streaming
    position cannot: refused, or None (the stream starts afresh) when `restart` allows it."""
    first = files[0]["data"]
    if all(_equal(first, f["data"]) for f in files[1:]):
        return first
    if restart:
        return None
    raise CheckpointError(f"{ckpt.path}: the data pipeline's position is per rank, so it cannot move from "
                          f"{ckpt.world_size} ranks to {env.world_size}; resume on {ckpt.world_size} ranks, or set "
                          "data.restart_on_resize=true to restart the stream from its beginning")


def _equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _load_compression(trainer: Trainer, files: list[dict], same_world: bool) -> list[str]:
    """Restore the compression state; returns what had to be reset. The owners' masters x are
    restored by name at any world size (the saved master, or the weight where none was kept);
    the per-rank estimator state (error feedback, reference points) only at the same world
    size; at another it restarts with a dense round."""
    saved = [f.get("compression", {}) for f in files]
    hooks = _compression_hooks(trainer.engine)
    if hooks is None or not trainer.cfg.compression.enabled:
        return ["compression state (compression is off in this run)"] if any(saved) else []
    state = {n: {"master": w} for n, w in certified_weights(files).items()}
    if same_world:
        for name, fields in saved[trainer.env.rank].items():
            state.setdefault(name, {}).update({k: v for k, v in fields.items() if k != "master"})
    hooks[1](state)
    per_rank = any(k != "master" for s in saved for fields in s.values() for k in fields)
    return ["compression estimator/error-feedback state (per rank)"] if per_rank and not same_world else []

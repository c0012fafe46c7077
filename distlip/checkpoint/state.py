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
    compression  this rank's compression state (only when the engine has one; under the outer
                 loop: round-start weights "master" of owned names, this rank's "local" weights,
                 the outer momentum and the estimator's fields, see `distributed.outer`)
    local        under the outer loop only: this rank's own optimiser and constrainer state of
                 every tensor, {"momentum", "constraint", "global_constraint", "sigma"}; resumed
                 on the same world size only

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

import torch

from distlip.checkpoint.export import ENSEMBLE_FILE, load_model, load_weights, save_model
from distlip.checkpoint.files import MANIFEST, Checkpoint
from distlip.checkpoint.store import CheckpointStore
from distlip.config import Config, config_from_dict
from distlip.data.tokenizers import tokenizer_from_dict
from distlip.distributed.deepspeed import uses_deepspeed
from distlip.distributed.engine import EMBED
from distlip.distributed.env import DistEnv
from distlip.errors import CheckpointError, ConfigError
from distlip.lipschitz.caps import unit_caps
from distlip.lipschitz.certificate import Certificate, certify_weights
from distlip.model import LipschitzTransformer, matrix_names

FORMAT = 1
RANK_FILE = "distlip_rank{}.pt"
# Settings a checkpoint's state only fits when they are unchanged (the tokenizer is checked too).
MUST_MATCH = ("optim.name", "optim.embed")


# ---- saving ----------------------------------------------------------------------------------

def save_checkpoint(store: CheckpointStore, step: int, rank: int, state: dict, meta: dict) -> Path:
    """Collective: every rank writes its `state` (the trainer's `state_dict()`) into the tag
    directory of `step`; the store commits it with `meta` (the run's config and tokenizer as
    JSON), points `latest` at it and rotates. Returns the tag directory."""
    state = _to_cpu({"format": FORMAT, **state})
    # Every rank holds about as much as this one; the store refuses a checkpoint that cannot fit.
    need = _tensor_bytes(state) * store.world_size
    path = store.begin(step, need)
    failure = None
    try:
        torch.save(state, path / RANK_FILE.format(rank))
    except (OSError, RuntimeError) as err:  # a full disk: torch reports it as "file write failed"
        failure = err
    return store.commit(step, {"format": FORMAT, **meta}, failure=failure, need_bytes=need)


def _tensor_bytes(tree) -> int:
    """Bytes of the tensors in a nested dict/list, plus a little per tensor for the file format."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size() + 512
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


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
            what = "is not a checkpoint" if d.exists() else "does not exist"
            raise CheckpointError(f"'{d}' {what}: give a step_NNNNNN directory (with {MANIFEST}) "
                                  "or a run directory that holds one")
        d = d / tag
    problem = CheckpointStore(d.parent).problem(d)
    if problem is not None:
        raise CheckpointError(f"checkpoint {d} is unusable: {problem}; give another checkpoint, or the run "
                              "directory for its newest good one")
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
    (model on CPU in eval mode, config, tokenizer, caps), as `export.load_model`."""
    d = Path(path)
    if (d / "model.safetensors").exists():
        return load_model(d)
    if (d / ENSEMBLE_FILE).is_file():
        raise CheckpointError(f"'{d}' is an ensemble of exported models, not one model: `distlip certify {d}` "
                              f"certifies it; to sample from or attack one member give its directory, e.g. "
                              f"'{d / 'member_0'}'")
    weights, cfg, tok, ckpt = read_checkpoint(d)
    model = LipschitzTransformer(cfg.model)
    load_weights(model, weights, str(ckpt.path), "the checkpoint is inconsistent; use another checkpoint of the run")
    return model.eval(), cfg, tok, unit_caps(cfg, matrix_names(model))


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


def load_checkpoint(ckpt: Checkpoint, cfg: Config, tokenizer, env: DistEnv, shapes: dict[str, tuple[int, ...]],
                    keeps_masters: bool) -> tuple[dict, str]:
    """The state this rank loads from `ckpt` (the layout of the trainer's `state_dict()`, every
    field merged by name, whatever world size wrote it), and one line saying what was restored,
    re-sharded and reset. `shapes`: every parameter's full shape; `keeps_masters`: this run
    keeps masters x apart from the module weights w (a compressed downlink)."""
    check_compatible(ckpt, cfg, tokenizer)
    files = read_rank_files(ckpt)
    # Module weights: the forward copies w only where this run keeps masters apart (a compressed
    # downlink, restored with the compression state); otherwise they are what the owners step, so x.
    weights = merged_field(files, "weights") if keeps_masters else certified_weights(files)
    for name, shape in shapes.items():
        saved = weights.get(name)
        if saved is None or tuple(saved.shape) != shape:
            found = "missing" if saved is None else f"shaped {tuple(saved.shape)}"
            raise CheckpointError(f"{ckpt.path}: {name} is {found}, the model needs {shape}")
    adam = merged_field(files, "adam")
    same = ckpt.world_size == env.world_size
    mine = files[env.rank] if same else files[0]
    data_state = mine["data"] if same else _common_data_state(files, ckpt, env, cfg.data.restart_on_resize)
    outer_before = ckpt.meta["config"].get("compression", {}).get("sync_every", 1) > 1
    compression, reset = _compression_state(cfg, env, files, same, outer_before)
    state = {"weights": weights, "momentum": merged_field(files, "momentum"), "adam": adam,
             "constraint": merged_field(files, "constraint"), "sigma": merged_field(files, "sigma"),
             "data": data_state, "rng": mine["rng"], "compression": compression,
             "local": mine.get("local") if same and outer_before == (cfg.compression.sync_every > 1) else None}
    if state["local"] is None and any("local" in f for f in files):
        reset.append("each rank's own local-step optimiser state (its round restarts from the round-start weights)")
    if data_state is None:
        reset.append("the data stream's per-rank position (the stream restarts from its beginning)")
    if same:
        done = f"resumed from {ckpt.path} at step {ckpt.step}"
        return state, done + (f"; reset: {', '.join(reset)}" if reset else "")
    embed = ""
    if EMBED in adam:
        before = _adam_holder(config_from_dict(ckpt.meta["config"]), ckpt.world_size)
        embed = f", the embedding's Adam state from {before} into {_adam_holder(cfg, env.world_size)}"
    matrices = sum(1 for name in shapes if name != EMBED)
    return state, (f"resumed from {ckpt.path} at step {ckpt.step} on {env.world_size} rank(s), written by "
                   f"{ckpt.world_size}: re-sharded by name the momenta and power-iteration vectors of {matrices} "
                   f"matrices{embed}; {'RNG' if data_state is None else 'data pipeline and RNG'} from rank 0's "
                   f"state; reset: {', '.join(reset) or 'nothing'}")


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


def _compression_state(cfg: Config, env: DistEnv, files: list[dict], same_world: bool,
                       outer_before: bool) -> tuple[dict | None, list[str]]:
    """The compression state to load (None with compression off) and what had to be reset. The
    owners' masters x are restored by name at any world size (the saved master, or the weight
    where none was kept); the per-rank estimator state (error feedback, reference points) only at
    the same world size, and only between runs that both use, or both do not use, the outer loop
    (`outer_before`: the checkpoint's run did); otherwise it restarts with a dense round."""
    saved = [f.get("compression", {}) for f in files]
    if not cfg.compression.enabled:
        return None, ["compression state (compression is off in this run)"] if any(saved) else []
    state = {n: {"master": w} for n, w in certified_weights(files).items()}
    if outer_before != (cfg.compression.sync_every > 1):
        kind = "outer loop's" if outer_before else "per-step"
        return state, [f"the {kind} compression state (this run {'does not use' if outer_before else 'uses'} "
                       "the outer loop)"] if any(saved) else []
    if same_world:
        for name, fields in saved[env.rank].items():
            state.setdefault(name, {}).update({k: v for k, v in fields.items() if k != "master"})
    per_rank = any(k != "master" for s in saved for fields in s.values() for k in fields)
    return state, ["compression estimator/error-feedback state (per rank)"] if per_rank and not same_world else []

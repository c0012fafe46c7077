"""Atomic, verified, rotating checkpoint directories written by all ranks together.

Layout of a run directory (``root``)::

    root/
      latest                    text: the tag of the newest committed checkpoint
      step_000400/
        manifest.json           written last, atomically; its presence is what "committed" means
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed)
        distlip_rank0.pt, distlip_rank1.pt, ...                            (distlip)
      step_000500/ ...

Protocol, on every rank (``begin``, ``commit`` and ``resolve`` are collective)::

    ckpt = store.resolve(resume)            # at start-up: None for a fresh start
    ...
    path = store.begin(step)                # an empty tag directory, ready for every rank
    engine.save_checkpoint(store.root, tag=path.name, save_latest=False)
    torch.save(extra, path / f"distlip_rank{rank}.pt")
    store.commit(step, meta={"config": ...})

``save_latest=False`` matters: DeepSpeed would otherwise rewrite ``root/latest`` (not atomically)
before the manifest exists. The directory must be on a filesystem every rank sees, because rank 0
hashes every rank's files.

A tag directory without a manifest is torn by definition (a save was interrupted); one whose
files do not match their manifest is corrupt. Both are skipped, with a warning, when looking for a
checkpoint to resume from. Nothing good is deleted or overwritten until a newer checkpoint has
been committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch.distributed as dist

from distlip.errors import CheckpointError, ConfigError

MANIFEST = "manifest.json"
LATEST = "latest"
MANIFEST_FORMAT = 1
_TAG = re.compile(r"step_(\d+)")
# Hashing threads: hashlib releases the GIL on large reads, so a few threads overlap disk reads
# of the per-rank shards; more than 8 rarely helps on one filesystem client.
_HASH_THREADS = 8
_CHUNK = 8 << 20  # bytes per read while hashing

Verify = Literal["full", "size"]
T = TypeVar("T")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (torn or corrupt) or old ones could not be removed."""


def tag_for(step: int) -> str:
    """The tag (directory name) of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:06d}"


def step_of(tag: str) -> int | None:
    """The step encoded in a tag, or None when ``tag`` is not a checkpoint name."""
    match = _TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its directory and parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        """Number of ranks that wrote it (resuming at another size needs resharding)."""
        return int(self.manifest["world_size"])

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]


class CheckpointStore:
    """Checkpoint directories under ``root``, kept to the newest ``keep_last`` committed ones.

    Args:
        root: run directory holding the ``step_*`` tag directories.
        keep_last: committed checkpoints kept after each commit (>= 1).
        rank, world_size: this process's place in the job.
        barrier: blocks until every rank calls it (required when ``world_size > 1``).
        broadcast: returns rank 0's argument on every rank (required when ``world_size > 1``);
            decisions about the directory are made once, on rank 0, so that all ranks agree
            even where filesystem views lag, and rank 0's errors are raised on every rank.
        verify: ``"full"`` checks sizes and SHA-256 of every file when resuming; ``"size"`` checks
            sizes only (catches truncation, not bit rot) for checkpoints too large to re-read.

    ``CheckpointStore.for_process_group`` wires rank, size and collectives from torch.distributed.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last: int = 3,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], Any] | None = None,
        broadcast: Callable[[Any], Any] | None = None,
        verify: Verify = "full",
    ) -> None:
        if keep_last < 1:
            raise ConfigError(f"checkpoint keep_last={keep_last}: keep at least 1 checkpoint")
        if verify not in ("full", "size"):
            raise ConfigError(f"checkpoint verify={verify!r}: use 'full' or 'size'")
        if world_size > 1 and (barrier is None or broadcast is None):
            raise ConfigError(
                f"CheckpointStore with world_size={world_size} needs barrier and broadcast: "
                "use CheckpointStore.for_process_group(root, ...)"
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.verify = verify
        self._barrier = barrier or (lambda: None)
        self._broadcast = broadcast or (lambda value: value)

    @classmethod
    def for_process_group(
        cls, root: str | os.PathLike[str], keep_last: int = 3, verify: Verify = "full"
    ) -> CheckpointStore:
        """A store for the default torch.distributed group (a single-process one if none is set up)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(root, keep_last, verify=verify)

        def broadcast(value: Any) -> Any:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        return cls(
            root,
            keep_last,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            barrier=dist.barrier,
            broadcast=broadcast,
            verify=verify,
        )

    # ------------------------------------------------------------------ collective operations

    def begin(self, step: int) -> Path:
        """Collective: an empty directory for the checkpoint of ``step``, created before any rank writes.

        A torn or corrupt leftover with the same tag (an interrupted save) is removed; a good
        checkpoint with that tag raises CheckpointError rather than being overwritten.
        """
        path = self.root / tag_for(step)

        def prepare() -> None:
            if (path / MANIFEST).exists() and self.problem(path) is None:
                raise CheckpointError(
                    f"{path} already holds a good checkpoint: resume from it (--resume auto) "
                    "or move it away before training over this step again"
                )
            try:
                if path.exists():
                    shutil.rmtree(path)
                path.mkdir(parents=True)
            except OSError as err:
                raise CheckpointError(f"could not prepare checkpoint directory {path}: {err}") from err

        self._on_rank0(prepare)
        return path

    def commit(self, step: int, meta: dict[str, Any] | None = None) -> Path:
        """Collective: seal the checkpoint of ``step`` once every rank has written its files.

        Rank 0 hashes the files, writes ``manifest.json`` (with ``meta``, which must be
        JSON-serialisable), points ``latest`` at it and removes checkpoints beyond ``keep_last``.
        Returns the tag directory; raises CheckpointError on every rank if sealing failed.
        """
        path = self.root / tag_for(step)
        meta = dict(meta or {})
        try:  # on every rank, before the barrier, so a bad meta fails everywhere alike
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint meta is not JSON-serialisable ({err}): pass plain values") from err
        self._barrier()  # every rank has finished writing into path

        def seal() -> None:
            try:
                self._write_manifest(path, step, meta)
                _atomic_write(self.root / LATEST, path.name)
            except OSError as err:
                raise CheckpointError(f"could not commit checkpoint {path}: {err}") from err
            self._rotate(path)

        self._on_rank0(seal)
        return path

    def resolve(self, resume: str | os.PathLike[str] | None) -> Checkpoint | None:
        """Collective: the checkpoint to resume from, verified, and the same on every rank.

        ``resume`` is ``None``/``""``/``"none"`` (fresh start), ``"auto"`` (newest good checkpoint under
        root, or None if there is none), a tag under root, or a path to a checkpoint directory.
        Raises CheckpointError when an explicitly named checkpoint is missing or bad, or when
        root holds committed checkpoints that resuming from ``resume`` would mix with a new run.
        """
        return self._on_rank0(lambda: self._resolve_here(resume))

    # ------------------------------------------------------------------ local (non-collective) queries

    def tag_dirs(self) -> list[Path]:
        """Every ``step_*`` directory under root, oldest step first (committed or not)."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and step_of(p.name) is not None]
        return sorted(dirs, key=lambda p: step_of(p.name))

    def find_good(self) -> str | None:
        """The tag of the newest (by step) checkpoint that verifies, or None.

        Each torn or corrupt newer one is skipped with a CheckpointWarning naming it and why.
        """
        for path in reversed(self.tag_dirs()):
            reason = self.problem(path)
            if reason is None:
                return path.name
            warnings.warn(
                f"checkpoint {path.name} skipped: {reason}; falling back to the previous one",
                CheckpointWarning,
                stacklevel=2,
            )
        return None

    def problem(self, path: Path) -> str | None:
        """Why the checkpoint at ``path`` cannot be used, or None when it verifies."""
        if not (path / MANIFEST).is_file():
            return "missing manifest: write was interrupted"
        try:
            files = _read_manifest(path)["files"]
            expected = [(entry["path"], int(entry["bytes"]), entry["sha256"]) for entry in files]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"unreadable manifest ({err})"
        # Sizes first: cheap, and they catch the usual damage (a truncated shard) without hashing.
        for name, size, _ in expected:
            file = path / name
            if not file.is_file():
                return f"missing file {name}"
            actual = file.stat().st_size
            if actual < size:
                return f"truncated file {name} ({actual} of {size} bytes)"
            if actual != size:
                return f"size mismatch in {name} ({actual} bytes, manifest says {size})"
        if self.verify == "full":
            digests = _sha256_files([path / name for name, _, _ in expected])
            for (name, _, sha), digest in zip(expected, digests):
                if digest != sha:
                    return f"checksum mismatch in {name}"
        return None

    # ------------------------------------------------------------------ internals

    def _on_rank0(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only; every rank returns its result, or raises when it failed."""
        outcome: tuple[bool, Any] | None = None
        error: Exception | None = None
        if self.rank == 0:
            try:
                outcome = (True, work())
            except Exception as err:  # any failure: the other ranks must not stay blocked in broadcast
                error = err
                outcome = (False, str(err) if isinstance(err, CheckpointError) else f"rank 0 failed: {err!r}")
        ok, value = self._broadcast(outcome)
        if ok:
            return value
        if error is not None:
            raise error
        raise CheckpointError(value)

    def _resolve_here(self, resume: str | os.PathLike[str] | None) -> Checkpoint | None:
        """Rank 0's part of ``resolve``."""
        if not resume or str(resume).lower() == "none":
            self._refuse_other_trajectories(None)
            return None
        if str(resume) == "auto":
            tag = self.find_good()
            return None if tag is None else Checkpoint(self.root / tag, _read_manifest(self.root / tag))
        path = self.root / resume if (self.root / resume).is_dir() else Path(resume)
        if not path.is_dir():
            available = ", ".join(p.name for p in self.tag_dirs()) or "none"
            raise CheckpointError(
                f"checkpoint {resume!s} not found: give a tag under {self.root} "
                f"(available: {available}), 'auto', or a checkpoint directory"
            )
        reason = self.problem(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is unusable: {reason}; resume from another tag or 'auto'")
        self._refuse_other_trajectories(path)
        return Checkpoint(path, _read_manifest(path))

    def _refuse_other_trajectories(self, start: Path | None) -> None:
        """Raise if root holds committed checkpoints that are not ancestors of ``start``.

        Training from ``start`` (None: from scratch) would later collide with them, and after a
        crash ``--resume auto`` would pick them up and silently splice two runs together.
        """
        start_step = -1
        if start is not None and start.resolve().parent == self.root.resolve():
            start_step = step_of(start.name) or 0
        others = [p.name for p in self.tag_dirs() if (p / MANIFEST).exists() and step_of(p.name) > start_step]
        if others:
            origin = "a fresh start" if start is None else f"resuming from {start}"
            raise CheckpointError(
                f"{self.root} already holds checkpoints {', '.join(others)} that {origin} would "
                "overwrite or mix with: use --resume auto, or move them away, or pick a new output directory"
            )

    def _write_manifest(self, path: Path, step: int, meta: dict[str, Any]) -> None:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
        if not files:
            raise CheckpointError(f"checkpoint {path} is empty: write the rank files between begin() and commit()")
        # fsync while hashing so the data is durable before the manifest that vouches for it.
        digests = _sha256_files(files, fsync=True)
        now = time.time()
        manifest = {
            "format": MANIFEST_FORMAT,
            "tag": path.name,
            "step": step,
            "world_size": self.world_size,
            "created_unix": now,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "files": [
                {"path": p.relative_to(path).as_posix(), "bytes": p.stat().st_size, "sha256": digest}
                for p, digest in zip(files, digests)
            ],
            "meta": meta,
        }
        _atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))

    def _rotate(self, newest: Path) -> None:
        """Remove committed checkpoints older than ``newest`` beyond ``keep_last``, and torn leftovers.

        Torn directories other than ``newest`` are dead: nobody writes while ranks are inside
        commit(). Failures only warn, since the new checkpoint is already committed.
        """
        newest_step = step_of(newest.name)
        older = [p for p in self.tag_dirs() if step_of(p.name) < newest_step]
        committed = [p for p in older if (p / MANIFEST).exists()]
        doomed = committed[: max(0, len(committed) - (self.keep_last - 1))]
        doomed += [p for p in self.tag_dirs() if p != newest and not (p / MANIFEST).exists()]
        for path in doomed:
            try:
                # Manifest first: if removal stops halfway the rest is plainly torn, not "corrupt".
                (path / MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(path)
            except OSError as err:
                warnings.warn(f"could not remove old checkpoint {path.name}: {err}", CheckpointWarning, stacklevel=3)


def _read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def _sha256_files(files: list[Path], fsync: bool = False) -> list[str]:
    """Hex SHA-256 of each file, streamed in chunks, several files at a time; optionally fsync each."""

    def digest(file: Path) -> str:
        value = hashlib.sha256()
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                value.update(chunk)
            if fsync:
                os.fsync(handle.fileno())
        return value.hexdigest()

    with ThreadPoolExecutor(max_workers=max(1, min(_HASH_THREADS, len(files)))) as pool:
        return list(pool.map(digest, files))


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

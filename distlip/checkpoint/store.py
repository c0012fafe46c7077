"""Atomic, verified, rotating checkpoint directories written by all ranks together.

A checkpoint is a tag directory `root/step_NNNNNN/` holding whatever files the ranks write into it
between `begin` and `commit` (distlip writes one `distlip_rank{r}.pt` per rank), sealed by a
`manifest.json` (step, world size, size and SHA-256 of every file) that rank 0 writes last, after
which `root/latest` names it. Layout and resume rules: docs/checkpoints.md; faults: docs/faults.md.

    ckpt = store.resolve(resume)            # collective, at start-up: None for a fresh start
    path = store.begin(step, need_bytes=n)  # collective: an empty tag directory, ready for every rank
    try:
        torch.save(state, path / f"distlip_rank{rank}.pt")
        failure = None
    except (OSError, RuntimeError) as err:  # e.g. the disk filled up
        failure = err
    store.commit(step, meta, failure=failure)  # collective: manifest, `latest`, rotation

A tag directory without a manifest is torn (a save was interrupted); one whose files do not match
their manifest is corrupt. Both are skipped, with a warning, when looking for a checkpoint to
resume from. Nothing good is deleted or overwritten until a newer checkpoint is committed. A full
disk loses nothing: `begin` refuses a checkpoint that cannot fit, and a write that fails on any
rank makes `commit` remove the torn directory; both raise one CheckpointError naming the directory
and the bytes needed, while `latest` still names the previous checkpoint. The directory must be on
a filesystem every rank sees: rank 0 hashes every rank's files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from distlip.checkpoint.files import (
    LATEST,
    MANIFEST,
    MANIFEST_FORMAT,
    Checkpoint,
    CheckpointWarning,
    atomic_write,
    read_manifest,
    sha256_files,
    step_of,
    tag_for,
)
from distlip.errors import CheckpointError, ConfigError

T = TypeVar("T")


class CheckpointStore:
    """Checkpoint directories under `root`, kept to the newest `keep_last` committed ones.

    Args:
        root: run directory holding the `step_*` tag directories.
        keep_last: committed checkpoints kept after each commit (>= 1).
        rank, world_size: this process's place in the job.
        barrier: blocks until every rank calls it (required when `world_size > 1`).
        broadcast: returns rank 0's argument on every rank (required when `world_size > 1`);
            decisions about the directory are made once, on rank 0, so that all ranks agree
            even where filesystem views lag, and rank 0's errors are raised on every rank.
        all_gather: every rank's argument, in rank order, on every rank (required when
            `world_size > 1`): which ranks could not write their files, and why.

    `CheckpointStore.for_process_group` wires rank, size and collectives from torch.distributed.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last: int = 3,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], Any] | None = None,
        broadcast: Callable[[Any], Any] | None = None,
        all_gather: Callable[[Any], list[Any]] | None = None,
    ) -> None:
        if keep_last < 1:
            raise ConfigError(f"checkpoint keep_last={keep_last}: keep at least 1 checkpoint")
        if world_size > 1 and (barrier is None or broadcast is None or all_gather is None):
            raise ConfigError(
                f"CheckpointStore with world_size={world_size} needs barrier, broadcast and all_gather: "
                "use CheckpointStore.for_process_group(root, ...)"
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier or (lambda: None)
        self._broadcast = broadcast or (lambda value: value)
        self._all_gather = all_gather or (lambda value: [value])

    @classmethod
    def for_process_group(cls, root: str | os.PathLike[str], keep_last: int = 3) -> CheckpointStore:
        """A store for the default torch.distributed group (a single-process one if none is set up)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(root, keep_last)

        def broadcast(value: Any) -> Any:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        def all_gather(value: Any) -> list[Any]:
            values: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(values, value)
            return values

        return cls(
            root,
            keep_last,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            barrier=dist.barrier,
            broadcast=broadcast,
            all_gather=all_gather,
        )

    # ------------------------------------------------------------------ collective operations

    def begin(self, step: int, need_bytes: int = 0) -> Path:
        """Collective: an empty directory for the checkpoint of `step`, created before any rank writes.

        A torn or corrupt leftover with the same tag (an interrupted save) is removed; a good
        checkpoint with that tag raises CheckpointError rather than being overwritten. So does a
        checkpoint that would not fit: `need_bytes` (all ranks' files together, estimated by the
        caller) or the previous checkpoint's size, whichever is larger, beyond the free space.
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
            need = max(need_bytes, self._latest_bytes())
            free = shutil.disk_usage(path).free
            if need > free:
                shutil.rmtree(path, ignore_errors=True)
                raise CheckpointError(self._no_space(path, need, free))

        self._on_rank0(prepare)
        return path

    def commit(
        self, step: int, meta: dict[str, Any] | None = None, failure: BaseException | None = None, need_bytes: int = 0
    ) -> Path:
        """Collective: seal the checkpoint of `step` once every rank has written its files.

        Rank 0 hashes the files, writes `manifest.json` (with `meta`, which must be
        JSON-serialisable), points `latest` at it and removes checkpoints beyond `keep_last`.
        Returns the tag directory; raises CheckpointError on every rank if sealing failed, or if
        any rank passes the `failure` of its own write: then the torn directory is removed and
        `latest` keeps naming the previous checkpoint. `need_bytes` is as for `begin`.
        """
        path = self.root / tag_for(step)
        meta = dict(meta or {})
        try:  # on every rank, before the barrier, so a bad meta fails everywhere alike
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint meta is not JSON-serialisable ({err}): pass plain values") from err
        # Also the barrier: every rank has finished writing into path.
        failed = [(r, why) for r, why in enumerate(self._all_gather(failure and _first_line(failure))) if why]
        if failed:

            def discard() -> None:
                shutil.rmtree(path, ignore_errors=True)
                raise CheckpointError(self._write_failed(path, need_bytes, *failed[0]))

            self._on_rank0(discard)

        def seal() -> None:
            try:
                self._write_manifest(path, step, meta)
                atomic_write(self.root / LATEST, path.name)
            except OSError as err:
                shutil.rmtree(path, ignore_errors=True)
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CheckpointError(self._write_failed(path, need_bytes, 0, _first_line(err))) from err
                raise CheckpointError(f"could not commit checkpoint {path}: {err}") from err
            self._rotate(path)

        self._on_rank0(seal)
        return path

    def resolve(self, resume: str | os.PathLike[str] | None) -> Checkpoint | None:
        """Collective: the checkpoint to resume from, verified, and the same on every rank.

        `resume` is `None`/`""`/`"none"` (fresh start), `"auto"` (newest good checkpoint under
        root, or None if there is none), a tag under root, or a path to a checkpoint directory.
        Raises CheckpointError when an explicitly named checkpoint is missing or bad, or when
        root holds committed checkpoints that resuming from `resume` would mix with a new run.
        """
        return self._on_rank0(lambda: self._resolve_here(resume))

    # ------------------------------------------------------------------ local (non-collective) queries

    def tag_dirs(self) -> list[Path]:
        """Every `step_*` directory under root, oldest step first (committed or not)."""
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
        """Why the checkpoint at `path` cannot be used, or None when it verifies."""
        if not (path / MANIFEST).is_file():
            return "missing manifest: write was interrupted"
        try:
            files = read_manifest(path)["files"]
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
        digests = sha256_files([path / name for name, _, _ in expected])
        for (name, _, sha), digest in zip(expected, digests):
            if digest != sha:
                return f"checksum mismatch in {name}"
        return None

    # ------------------------------------------------------------------ internals

    def _latest_bytes(self) -> int:
        """Total size of the newest committed checkpoint per its manifest (0 if none): the next
        one of the same run is as large."""
        for path in reversed(self.tag_dirs()):
            try:
                return sum(int(entry["bytes"]) for entry in read_manifest(path)["files"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return 0

    def _kept(self) -> str:
        latest = self.root / LATEST
        name = latest.read_text().strip() if latest.is_file() else ""
        return f"{name} is still the latest checkpoint, intact" if name else "no checkpoint was committed yet"

    def _no_space(self, path: Path, need: int, free: int) -> str:
        return (f"no space for checkpoint {path.name} in {self.root}: it needs about {need:,} bytes and "
                f"{free:,} are free; free space there or set train.out on a larger disk, then resume with "
                f"--resume auto ({self._kept()})")

    def _write_failed(self, path: Path, need_bytes: int, rank: int, reason: str) -> str:
        """The message for a checkpoint that `rank` could not write (`reason`), once its
        directory is removed; rank 0's view of the disk."""
        free = shutil.disk_usage(self.root).free
        # The write failed, so it needed more than is free now that its partial files are gone.
        need = max(need_bytes, self._latest_bytes(), free + 1)
        if any(mark in reason.lower() for mark in ("space", "quota", "write failed")):
            return self._no_space(path, need, free)
        return (f"rank {rank} could not write checkpoint {path.name} in {self.root} ({reason}); it was discarded "
                f"and {self._kept()}")

    def _on_rank0(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 only; every rank returns its result, or raises when it failed."""
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
        """Rank 0's part of `resolve`."""
        if not resume or str(resume).lower() == "none":
            self._refuse_other_trajectories(None)
            return None
        if str(resume) == "auto":
            tag = self.find_good()
            return None if tag is None else Checkpoint(self.root / tag, read_manifest(self.root / tag))
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
        return Checkpoint(path, read_manifest(path))

    def _refuse_other_trajectories(self, start: Path | None) -> None:
        """Raise if root holds committed checkpoints that are not ancestors of `start`.

        Training from `start` (None: from scratch) would later collide with them, and after a
        crash `--resume auto` would pick them up and silently splice two runs together.
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
        digests = sha256_files(files, fsync=True)
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
        atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))

    def _rotate(self, newest: Path) -> None:
        """Remove committed checkpoints older than `newest` beyond `keep_last`, and torn leftovers.

        Torn directories other than `newest` are dead: nobody writes while ranks are inside
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

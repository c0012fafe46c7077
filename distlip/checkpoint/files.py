"""The on-disk format of a checkpoint: tag names, the manifest, hashing and durable writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LATEST = "latest"
MANIFEST_FORMAT = 1
_TAG = re.compile(r"step_(\d+)")
# Hashing threads: hashlib releases the GIL on large reads, so a few threads overlap disk reads
# of the per-rank shards; more than 8 rarely helps on one filesystem client.
_HASH_THREADS = 8
_CHUNK = 8 << 20  # bytes per read while hashing


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (torn or corrupt) or old ones could not be removed."""


def tag_for(step: int) -> str:
    """The tag (directory name) of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:06d}"


def step_of(tag: str) -> int | None:
    """The step encoded in a tag, or None when `tag` is not a checkpoint name."""
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


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def sha256_files(files: list[Path], fsync: bool = False) -> list[str]:
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


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Document shuffling and packing into fixed-length training rows.

Documents arrive as int32 token arrays that already start with the end-of-text id (the
pipeline prefixes every document with it, GPT-2 style), so the packed stream has EOT between
any two documents. Both stages have a `snapshot()` of plain Python/numpy objects and a
`restore()`, which is what makes the streaming pipeline resume exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from distlip.seeds import stream_seed


class ShuffleBuffer:
    """A seeded document-level shuffle: holds up to `size` documents; once full, each pushed
    document replaces a uniformly random resident, which is emitted. `size` ≤ 1 passes
    documents through in order.

    Unlike `IterableDataset.shuffle`, whose buffer is lost on resume, the residents and the
    generator state are part of the snapshot.
    """

    def __init__(self, size: int, seed: int, rank: int):
        self.size = size
        self.docs: list[np.ndarray] = []
        self.rng = np.random.default_rng(stream_seed(seed, "shuffle", rank))

    def push(self, doc: np.ndarray) -> np.ndarray | None:
        """Add a document; returns the one that leaves the buffer (None while it fills)."""
        if self.size <= 1:
            return doc
        if len(self.docs) < self.size:
            self.docs.append(doc)
            return None
        i = int(self.rng.integers(self.size))
        out, self.docs[i] = self.docs[i], doc
        return out

    def pop(self) -> np.ndarray | None:
        """A uniformly random resident (for draining at the end of a finite stream), or None."""
        if not self.docs:
            return None
        i = int(self.rng.integers(len(self.docs)))
        self.docs[i], self.docs[-1] = self.docs[-1], self.docs[i]
        return self.docs.pop()

    def snapshot(self) -> dict:
        return {"docs": list(self.docs), "rng": self.rng.bit_generator.state}

    def restore(self, snap: dict) -> None:
        self.docs = list(snap["docs"])
        self.rng.bit_generator.state = snap["rng"]


class Packer:
    """Concatenates documents and cuts (input, target) batches of shape (batch, seq_len).

    A batch spans batch·seq_len + 1 consecutive stream tokens: row i holds tokens
    [i·seq_len, (i+1)·seq_len] (seq_len + 1 of them), inputs are the first seq_len and targets
    the last seq_len. Rows and batches overlap by that one boundary token, so every token of the
    stream is an input exactly once and every next-token pair is trained, including across rows.
    """

    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.chunks: list[np.ndarray] = []
        self.size = 0  # tokens held

    def add(self, doc: np.ndarray) -> None:
        self.chunks.append(doc)
        self.size += len(doc)

    def ready(self) -> bool:
        return self.size >= self.batch_size * self.seq_len + 1

    def pop(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (inputs, targets), int64 (batch, seq_len) each; call only when `ready()`."""
        n = self.batch_size * self.seq_len
        flat = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        span = flat[: n + 1].astype(np.int64)
        self.chunks, self.size = [flat[n:]], len(flat) - n  # the boundary token starts the next batch
        return span[:-1].reshape(self.batch_size, self.seq_len), span[1:].reshape(self.batch_size, self.seq_len)

    def snapshot(self) -> dict:
        return {"chunks": list(self.chunks)}

    def restore(self, snap: dict) -> None:
        self.chunks = list(snap["chunks"])
        self.size = sum(len(c) for c in self.chunks)


def document_causal_mask(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Boolean attention mask (batch, 1, seq_len, seq_len) for packed rows x (batch, seq_len):
    True where query i may attend to key j, i.e. j ≤ i within the same document."""
    return dense_document_mask(document_ids(x, eot_id))


def dense_document_mask(ids: torch.Tensor) -> torch.Tensor:
    """The document-causal mask of per-token document ids `ids` (batch, seq_len) as one boolean
    (batch, 1, seq_len, seq_len) tensor, `ids[b, i] == ids[b, j] and j ≤ i` (what SDPA reads).
    O(seq_len²) bytes per row: FlexAttention reads the ids themselves (`model.document_block_mask`)."""
    T = ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]


def document_ids(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Per-token document index within each row, (batch, seq_len) int64, for document-causal
    attention: a query may attend to a key at or before it only where the ids are equal.

    Every document starts with an EOT, so the id increments at each EOT: an EOT belongs to the
    document it starts (two EOTs in a row make a one-token document), and tokens before a row's
    first EOT continue a document begun in an earlier row and get id 0. Ids never decrease along
    a row, which `model.document_block_mask` relies on.
    """
    return torch.cumsum(x == eot_id, dim=1)

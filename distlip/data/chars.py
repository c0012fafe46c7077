"""In-memory token batches for a corpus that fits in RAM (the Shakespeare default, local text).

Training windows start at uniformly random offsets drawn from a private generator (so the
batch order is part of the resumable state); validation uses non-overlapping windows over
the whole held-out tail of the text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distlip.data.corpus import shakespeare_text
from distlip.data.tokenizers import CharTokenizer
from distlip.errors import DataError


def read_text_file(path: str | Path) -> str:
    """A local UTF-8 text file; empty or binary files are refused with the reason."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{p}' not found; set data.path to an existing text file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file '{p}' is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise DataError(f"data file '{p}' is empty; point data.path at a file with text")
    if "\x00" in text:
        raise DataError(f"data file '{p}' contains NUL bytes: it looks binary, not text")
    return text


class InMemoryBatches:
    """Random (input, target) windows from a 1-D token array.

    `next_batch()` returns two int64 tensors of shape (batch, seq_len); targets are inputs
    shifted by one token. Each rank draws its own windows from a generator seeded with
    (seed, rank), so ranks see different data and the stream is reproducible.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0):
        if len(tokens) < seq_len + 2:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than one window "
                            f"of model.context={seq_len}; use more text or a shorter context")
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        self.seq_len, self.batch_size = seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self._offsets = torch.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts[:, None] + self._offsets]
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def val_windows(tokens: np.ndarray, seq_len: int, max_windows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, target) windows over the whole split, (n, seq_len) each.

    `max_windows` > 0 keeps an evenly spaced fixed subset (for cheap periodic evaluation).
    """
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DataError(f"the validation split has {len(tokens)} tokens, fewer than one window of {seq_len}")
    idx = np.arange(n)
    if 0 < max_windows < n:
        idx = idx[np.linspace(0, n - 1, max_windows).round().astype(np.int64)]
    t = torch.from_numpy(np.ascontiguousarray(tokens))
    starts = torch.from_numpy(idx * seq_len)
    windows = t[starts[:, None] + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def load_char_corpus(source: str, path: str, val_fraction: float) -> tuple[CharTokenizer, np.ndarray, np.ndarray]:
    """Text → (tokenizer, train ids, val ids): the vocabulary is every character in the text,
    the split is the first (1 − val_fraction) of the text for training, the tail for validation."""
    text = shakespeare_text() if source == "shakespeare" else read_text_file(path)
    tok = CharTokenizer.from_text(text)
    ids = tok.encode_array(text)
    cut = int(len(ids) * (1 - val_fraction))
    return tok, ids[:cut], ids[cut:]

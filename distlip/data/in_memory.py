"""In-memory token batches for a corpus that fits in RAM (the Shakespeare default, local text).

Training windows start at uniformly random offsets drawn from a private generator (so the
batch order is part of the resumable state); validation uses non-overlapping windows over
the whole held-out tail of the text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distlip.data.sources import shakespeare_text
from distlip.data.tokenizers import CharTokenizer
from distlip.errors import DataError


def read_text_file(path: str | Path) -> str:
    """A local UTF-8 text file; empty or binary files are refused with the reason."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "not found"
        raise DataError(f"data file '{p}' {what}; set data.path to an existing text file")
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

    Each optimiser step draws one *global* batch of `micro_batch × world_size × accum`
    window starts from a generator seeded with `seed`; `next_batch()` hands this rank its
    slice for the current micro-step, as two int64 tensors of shape (micro_batch, seq_len)
    (targets are inputs shifted by one token). Every layout of ranks × accumulation
    therefore trains on exactly the same global batch, which is what makes a sharded run
    comparable with a single-process one, and the state at a step boundary is just the
    generator.

    `soft` (len(tokens), V): a distribution over the vocabulary for every token of the array (a
    teacher's prediction of it, `distlip.teacher`); `next_batch()` then also returns the targets'
    rows, (micro_batch, seq_len, V) float32, each normalised to sum 1.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, accum: int = 1, soft: torch.Tensor | None = None):
        if len(tokens) < seq_len + 2:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than one window "
                            f"of model.context={seq_len}; use more text or a shorter context")
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        if soft is not None and soft.shape[0] != len(tokens):
            raise DataError(f"soft targets for {soft.shape[0]} tokens given for a split of {len(tokens)}")
        self.soft = soft
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)
        self._starts: torch.Tensor | None = None
        self._micro = 0

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        if self._micro == 0:
            n = self.micro_batch * self.world_size * self.accum
            self._starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (n,), generator=self.generator)
        first = (self._micro * self.world_size + self.rank) * self.micro_batch
        starts = self._starts[first:first + self.micro_batch]
        self._micro = (self._micro + 1) % self.accum
        at = starts[:, None] + self._offsets
        windows = self.tokens[at]
        if self.soft is None:
            return windows[:, :-1], windows[:, 1:]
        q = self.soft[at[:, 1:]].float()
        return windows[:, :-1], windows[:, 1:], q / q.sum(-1, keepdim=True)

    def state_dict(self) -> dict:
        """Valid at a step boundary (every micro-batch of the step consumed)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._micro = 0


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

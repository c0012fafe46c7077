"""Tokenizers behind one small interface: `encode`, `decode`, `vocab_size`, `eot_id`, `to_dict`.

`to_dict()` is stored in a run's config.json so `certify`, `sample` and resume rebuild the
exact tokenizer without the training data.
"""

from __future__ import annotations

import numpy as np

from distlip.errors import ConfigError, DataError


class CharTokenizer:
    """Character level: the vocabulary is the sorted set of characters of the training text.

    An end-of-text id (one past the characters) is reserved only when `with_eot` is set,
    for packing separate documents; the in-memory Shakespeare path has one document.
    """

    kind = "char"

    def __init__(self, chars: str, with_eot: bool = False):
        if not chars:
            raise DataError("cannot build a character vocabulary from empty text")
        self.chars = "".join(sorted(set(chars)))
        self.with_eot = with_eot
        self._index = {c: i for i, c in enumerate(self.chars)}
        self._table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int64)
        for c, i in self._index.items():
            self._table[ord(c)] = i

    @classmethod
    def from_text(cls, text: str, with_eot: bool = False) -> "CharTokenizer":
        return cls(text, with_eot)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + int(self.with_eot)

    @property
    def eot_id(self) -> int | None:
        return len(self.chars) if self.with_eot else None

    def encode_array(self, text: str) -> np.ndarray:
        """Text → int64 ids, vectorised (the default corpus is ~5M characters)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
        if (ids < 0).any():
            bad = text[int(np.argmax(ids < 0))]
            raise DataError(f"character {bad!r} is not in the tokenizer's vocabulary; "
                            "build the vocabulary from text that contains it")
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if 0 <= i < n)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars, "with_eot": self.with_eot}


def tokenizer_from_dict(data: dict):
    """Rebuild a tokenizer saved with `to_dict`."""
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(data["chars"], data.get("with_eot", False))
    raise ConfigError(f"unknown tokenizer kind {kind!r} in saved config; expected one of: char")

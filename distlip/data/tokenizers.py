"""Tokenizers behind one small interface: `encode`, `encode_array`, `encode_batch`, `decode`,
`vocab_size`, `eot_id`, `to_dict`.

`to_dict()` is stored in a run's config.json so `certify`, `sample` and resume rebuild the
exact tokenizer without the training data (a BPE tokenizer embeds its whole JSON).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from distlip.errors import ConfigError, DataError

EOT_TOKEN = "<|endoftext|>"


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
    def from_text(cls, text: str, with_eot: bool = False) -> CharTokenizer:
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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if 0 <= i < n)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars, "with_eot": self.with_eot}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) backed by the `tokenizers` library.

    Every byte sequence is representable, so any text round-trips exactly. `<|endoftext|>`
    is the end-of-text id; it is produced only by the packer, never by `encode`: a document
    that literally contains the string "<|endoftext|>" is encoded as ordinary text, so it
    cannot forge a document boundary.
    """

    kind = "bpe"

    def __init__(self, tokenizer, name: str = ""):
        eot = tokenizer.token_to_id(EOT_TOKEN)
        if eot is None:
            raise DataError(f"tokenizer {name or '(unnamed)'} has no {EOT_TOKEN} token; "
                            "train one with `distlip tokenizer train` (it adds it)")
        tokenizer.encode_special_tokens = True  # not stored in the JSON: set on every load
        self.tokenizer, self.name, self._eot = tokenizer, name, eot

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """A `tokenizer.json`, or a directory holding one."""
        from tokenizers import Tokenizer

        p = Path(path)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise DataError(f"tokenizer file '{p}' not found; train one with "
                            "`distlip tokenizer train --vocab-size N --out DIR` or use data.tokenizer=char")
        try:
            tokenizer = Tokenizer.from_file(str(p))
        except Exception as exc:  # the library raises a bare Exception for malformed JSON
            raise DataError(f"tokenizer file '{p}' could not be read: {(str(exc).splitlines() or [''])[0]}") from None
        return cls(tokenizer, name=str(p))

    @classmethod
    def from_pretrained(cls, name: str) -> BPETokenizer:
        """A tokenizer from the Hugging Face hub (or its local cache)."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_pretrained(name), name=name)
        except OSError as exc:  # offline or no network: LocalEntryNotFoundError (after retries without HF_HUB_OFFLINE)
            raise DataError(
                f"tokenizer '{name}' cannot be fetched: the Hugging Face hub is unreachable "
                f"({type(exc).__name__}); offline, use a local tokenizer.json (data.tokenizer=PATH), "
                "train one with `distlip tokenizer train --vocab-size N --out DIR`, or data.tokenizer=char") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once; the library spreads them over its own threads
        (RAYON_NUM_THREADS caps them)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "json": self.tokenizer.to_str()}


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE with `<|endoftext|>` on an iterable of documents.

    `vocab_size` counts the 256 byte tokens, the merges and the special token; a small
    corpus may stop short of it (no pair left to merge at `min_frequency`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ConfigError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                          "257 tokens (256 bytes + <|endoftext|>)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 split regex, no added space
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOT_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok, name="trained")


def load_tokenizer(spec: str, text: str | None = None):
    """`data.tokenizer` → a tokenizer with an end-of-text id.

    `char`: the characters of `text` plus an end-of-text id (for packing documents);
    `gpt2`: GPT-2's BPE from the hub (needs network or the local hub cache);
    anything else: a path to a `tokenizer.json` or a directory holding one.
    """
    if spec == "char":
        if text is None:
            raise DataError("the char tokenizer builds its vocabulary from the training text; pass the text, "
                            "or use a BPE tokenizer (data.tokenizer=gpt2 or a tokenizer.json)")
        return CharTokenizer.from_text(text, with_eot=True)
    if spec == "gpt2":
        return BPETokenizer.from_pretrained("gpt2")
    p = Path(spec)
    if p.exists() or spec.endswith(".json"):
        return BPETokenizer.from_file(p)
    raise DataError(f"data.tokenizer='{spec}' is not char, gpt2 or an existing tokenizer.json path")


def tokenizer_from_dict(data: dict):
    """Rebuild a tokenizer saved with `to_dict` (offline: BPE rebuilds from the embedded JSON)."""
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(data["chars"], data.get("with_eot", False))
    if kind == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(data["json"]), name=data.get("name", ""))
    raise ConfigError(f"unknown tokenizer kind {kind!r} in saved config; expected one of: char, bpe")

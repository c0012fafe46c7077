"""Streaming token batches for corpora that do not fit in RAM, sharded by rank and resumable.

Pipeline, per rank (the stages after reading run in one background thread):

1. read: the source as a `datasets.IterableDataset` (`sources.open_source`), split with
   `datasets.distributed.split_dataset_by_node`. With `num_shards % world_size == 0` each rank
   reads whole files (shards); otherwise every rank reads and parses everything and keeps every
   world_size-th document (so use a file count divisible by the world size for large corpora).
   Either way each document of an epoch goes to exactly one rank.
2. hold out: with `data.val_tokens > 0` the first documents of the source (unsharded, in
   order) up to `val_tokens` tokens are the validation set (`HeldOut`); training drops every
   document whose text equals one of them, on every rank.
3. tokenise `read_batch` documents at a time (`encode_batch`); each document is prefixed with EOT.
4. shuffle: a seeded document buffer of `data.shuffle_buffer` documents (`ShuffleBuffer`),
   drained at the end of every epoch, so an epoch's documents are shuffled among themselves
   and the buffer never holds one document twice.
5. pack into batches of (batch, seq_len) inputs and targets (`Packer`).
6. prefetch: up to `data.prefetch` batches wait in a bounded queue, so the accelerator does
   not wait on tokenisation.

`data.epochs = 0` repeats the source forever (from epoch 1 on `datasets` reshuffles the file
order, identically on every rank, so a file may move to another rank in a later epoch); the
packer carries over epoch boundaries, so nothing is dropped. With `data.epochs > 0` the stream
ends after that many passes: the last tokens that do not fill a whole batch (between 1 and
batch·seq_len per rank, counted in `dropped_tokens`) are never inputs; the first of them is the
last batch's final target.

`state_dict()` belongs to the last batch handed out by `next_batch()`, not to what the prefetch
thread has prepared, so a pipeline restored from it yields exactly the batches an uninterrupted
one would have yielded next.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from distlip.config.schema import DataConfig
from distlip.data.packing import Packer, ShuffleBuffer
from distlip.data.sources import describe, iter_documents, open_source, text_batches
from distlip.data.tokenizers import load_tokenizer
from distlip.errors import DataError

STATE_VERSION = 1


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _encode_documents(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Texts → int32 token arrays, each starting with the end-of-text id."""
    docs = []
    for ids in tokenizer.encode_batch(texts):
        doc = np.empty(len(ids) + 1, dtype=np.int32)
        doc[0], doc[1:] = tokenizer.eot_id, ids
        docs.append(doc)
    return docs


@dataclass(frozen=True)
class HeldOut:
    """The validation set: the source's first documents, taken whole until `val_tokens` tokens.

    `tokens`: int64 (val_tokens,), documents each prefixed with EOT, in source order (the last
    document may be cut; its rest is not trained on either). Evaluate it with
    `chars.val_windows(tokens, seq_len)`. `digests`: the held-out documents' text hashes.
    """

    tokens: np.ndarray
    digests: frozenset


def hold_out(cfg: DataConfig, tokenizer, source=None, max_batch: int = 256) -> HeldOut:
    """Read the head of the source (unsharded, unshuffled) until `cfg.val_tokens` tokens.

    `source`: the dataset `open_source(cfg)` returned, if the caller has it already. Documents
    are tokenised in batches that double from 1 up to `max_batch`, so a few huge documents
    (whole plays) are not all tokenised to keep a small prefix of them.
    """
    docs, digests, total, n = [], set(), 0, 1
    texts_iter = iter_documents(cfg, source)
    while total < cfg.val_tokens:
        texts = [t for _, t in zip(range(n), texts_iter)]
        n = min(2 * n, max_batch)
        if not texts:
            raise DataError(f"{describe(cfg)} has only {total} tokens, fewer than data.val_tokens={cfg.val_tokens} "
                            "held out for validation; lower data.val_tokens")
        for text, doc in zip(texts, _encode_documents(tokenizer, texts)):
            if total >= cfg.val_tokens:
                break
            docs.append(doc)
            digests.add(_digest(text))
            total += len(doc)
    return HeldOut(np.concatenate(docs)[: cfg.val_tokens].astype(np.int64), frozenset(digests))


def load_stream_tokenizer(cfg: DataConfig):
    """`data.tokenizer` for a streamed source; `char` reads the whole source once to collect
    every character it contains (affordable for local corpora, not for a hub-sized one)."""
    if cfg.tokenizer != "char":
        return load_tokenizer(cfg.tokenizer)
    if cfg.source == "hub":
        raise DataError("data.tokenizer=char needs every character of the source up front, which a hub dataset "
                        "cannot give; use data.tokenizer=gpt2 or a tokenizer.json from `distlip tokenizer train`")
    chars: set[str] = set()
    for text in iter_documents(cfg):
        chars.update(text)
    if not chars:
        raise DataError(f"{describe(cfg)} has no text to build a character vocabulary from")
    return load_tokenizer("char", text="".join(chars))


@dataclass
class _Position:
    """Where the reader is: the rank's dataset state after the last read batch, the epoch,
    documents read in it, documents read and tokenised but not yet shuffled/packed, and whether
    the epoch's reading is over and the shuffle buffer is being drained."""

    dataset: dict | None = None
    epoch: int = 0
    docs_in_epoch: int = 0
    pending: deque = field(default_factory=deque)
    draining: bool = False

    def copy(self) -> _Position:
        return _Position(self.dataset, self.epoch, self.docs_in_epoch, deque(self.pending), self.draining)


@dataclass
class _Snapshot:
    """Everything needed to resume right after one batch (numpy arrays, not yet serialised)."""

    position: _Position
    buffer: dict
    packer: dict
    batches: int


class _End:
    """Queued after the last batch of a finite stream."""

    def __init__(self, dropped: int):
        self.dropped = dropped


def _pack_arrays(arrays: list[np.ndarray]) -> dict:
    lengths = [len(a) for a in arrays]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return {"tokens": torch.from_numpy(flat.astype(np.int32)), "lengths": torch.tensor(lengths, dtype=torch.int64)}


def _unpack_arrays(packed: dict) -> list[np.ndarray]:
    flat = packed["tokens"].numpy()
    ends = np.cumsum(packed["lengths"].numpy())
    return [flat[e - n: e] for e, n in zip(ends, packed["lengths"].tolist())]


class StreamingBatches:
    """(input, target) batches from a streamed corpus: the `InMemoryBatches` interface.

    `next_batch()` returns two int64 tensors of shape (batch_size, seq_len) (targets are inputs
    shifted by one token); `data.packing.document_ids(x, tokenizer.eot_id)` gives per-token
    document ids for document-causal attention. `state_dict()` / `load_state_dict()` hold this
    rank's position (dataset state, shuffle buffer, packing remainder, unpacked documents);
    tensors, ints and strings only, so `torch.load(weights_only=True)` reads them back.

    `held_out` lets the trainer share one `HeldOut`; when None and `cfg.val_tokens > 0` it is
    computed here. `read_batch`: documents read and tokenised together.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, held_out: HeldOut | None = None, read_batch: int = 256):
        if tokenizer.eot_id is None:
            raise DataError("streaming packs documents separated by an end-of-text token; this tokenizer has none "
                            "(use load_tokenizer('char', text), which adds one, or a BPE tokenizer)")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if seq_len < 1 or batch_size < 1 or read_batch < 1:
            raise DataError("seq_len, batch_size and read_batch must be positive")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.read_batch = read_batch
        # opened here so a bad path, column or offline hub fails at start-up, in the caller's thread;
        # restarts (load_state_dict) reuse it, so local files are UTF-8 checked (a full read) once
        self._source = open_source(cfg)
        if held_out is None and cfg.val_tokens > 0:
            held_out = hold_out(cfg, tokenizer, self._source)
        self.held_out = held_out
        self._exclude = self.held_out.digests if self.held_out is not None else frozenset()
        self._snapshot: _Snapshot | None = None  # state after the last batch handed out; None: the start
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._ended = False
        self.dropped_tokens = 0  # set when a finite stream ends

    # ---- the producer (runs in the background thread) ----------------------------------------

    def _batches(self, snap: _Snapshot | None):
        """Yield (x, y, snapshot) from `snap` on; a generator, so one thread owns all of its state."""
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self._source, rank=self.rank, world_size=self.world_size)
        buffer = ShuffleBuffer(self.cfg.shuffle_buffer, self.seed, self.rank)
        packer = Packer(self.batch_size, self.seq_len)
        pos, batches = _Position(), 0
        if snap is not None:
            pos = snap.position.copy()
            buffer.restore(snap.buffer)
            packer.restore(snap.packer)
            batches = snap.batches
            if pos.dataset is not None:
                ds.load_state_dict(pos.dataset)
        reader = None

        while True:
            while pos.pending or pos.draining:
                if pos.pending:
                    doc = buffer.push(pos.pending.popleft())
                else:
                    doc = buffer.pop()
                    if doc is None:  # drained: the epoch is over
                        pos.epoch, pos.docs_in_epoch, pos.draining, reader = pos.epoch + 1, 0, False, None
                if doc is not None:
                    packer.add(doc)
                while packer.ready():
                    x, y = packer.pop()
                    batches += 1
                    yield x, y, _Snapshot(pos.copy(), buffer.snapshot(), packer.snapshot(), batches)
            if 0 < self.cfg.epochs <= pos.epoch:
                break
            if reader is None:
                ds.set_epoch(pos.epoch)  # before iterating: a loaded state applies to its own epoch only
                reader = text_batches(ds, self.cfg, self.read_batch)
            texts = next(reader, None)
            if texts is None:
                if pos.docs_in_epoch == 0:
                    raise DataError(f"{describe(self.cfg)} gave rank {self.rank} of {self.world_size} no documents "
                                    "(empty source, every document held out for validation, or fewer files/documents "
                                    "than ranks)")
                pos.draining = True
                continue
            if self._exclude:
                texts = [t for t in texts if _digest(t) not in self._exclude]
            pos.dataset = ds.state_dict()
            pos.pending.extend(_encode_documents(self.tokenizer, texts))
            pos.docs_in_epoch += len(texts)
        yield _End(packer.size)

    def _run(self, snap: _Snapshot | None, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in self._batches(snap):
                if isinstance(item, _End):
                    put(item)
                    return
                x, y, s = item
                if not put((torch.from_numpy(x), torch.from_numpy(y), s)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            put(exc)

    # ---- the consumer ---------------------------------------------------------------------------

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.cfg.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._snapshot, self._queue, self._stop),
                                        name=f"distlip-data-rank{self.rank}", daemon=True)
        self._thread.start()

    def _next(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._ended:
            return None
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if isinstance(item, _End):
            self._ended, self.dropped_tokens = True, item.dropped
            return None
        x, y, self._snapshot = item
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets), int64 (batch_size, seq_len) each."""
        batch = self._next()
        if batch is None:
            n = self._snapshot.batches if self._snapshot else 0
            raise DataError(f"the stream of {describe(self.cfg)} ended after data.epochs={self.cfg.epochs} "
                            f"pass(es) ({n} batches on rank {self.rank}); set data.epochs=0 to repeat it")
        return batch

    def __iter__(self):
        """Batches until a finite stream ends (forever with data.epochs=0)."""
        while (batch := self._next()) is not None:
            yield batch

    def close(self) -> None:
        """Stop the prefetch thread (it ends at its next hand-over; prepared batches are discarded)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> StreamingBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- checkpointing --------------------------------------------------------------------------

    def _identity(self) -> dict:
        c = self.cfg
        return {"source": c.source, "path": c.path, "name": c.name, "subset": c.subset, "split": c.split,
                "text_column": c.text_column, "shuffle_buffer": c.shuffle_buffer, "val_tokens": c.val_tokens,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size,
                "vocab_size": self.tokenizer.vocab_size, "n_shards": self._source.num_shards}

    def state_dict(self) -> dict:
        """This rank's position after the last batch handed out (save one per rank)."""
        state = {"version": STATE_VERSION, "identity": self._identity(), "ended": self._ended,
                 "dropped_tokens": self.dropped_tokens, "position": None}
        s = self._snapshot
        if s is not None:
            state["position"] = {
                "dataset": s.position.dataset, "epoch": s.position.epoch, "docs_in_epoch": s.position.docs_in_epoch,
                "draining": s.position.draining, "pending": _pack_arrays(list(s.position.pending)),
                "buffer": _pack_arrays(s.buffer["docs"]),
                "rng": s.buffer["rng"], "packer": _pack_arrays(s.packer["chunks"]), "batches": s.batches}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the run must match in source, rank, world size, seed and shapes."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}; it was saved by "
                            "another distlip version")
        mine, saved = self._identity(), state["identity"]
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if diff:
            raise DataError("the streaming data state does not match this run (" + "; ".join(diff) +
                            "); resume with the same data config, world size and batch shape, or start the data afresh")
        self.close()
        self._ended, self.dropped_tokens = state["ended"], state["dropped_tokens"]
        p = state["position"]
        self._snapshot = None if p is None else _Snapshot(
            _Position(p["dataset"], p["epoch"], p["docs_in_epoch"], deque(_unpack_arrays(p["pending"])), p["draining"]),
            {"docs": _unpack_arrays(p["buffer"]), "rng": p["rng"]},
            {"chunks": _unpack_arrays(p["packer"])}, p["batches"])

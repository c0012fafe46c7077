"""The streaming data pipeline on small local corpora: sharding by rank, packing, exact resume,
held-out validation, the hub code path (offline), error messages, and `distlip tokenizer train`."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distlip.config import DataConfig, load_config
from distlip.data.packing import Packer, ShuffleBuffer, document_ids
from distlip.data.sources import first_invalid_utf8, shakespeare_plays
from distlip.data.stream import StreamingBatches, load_stream_tokenizer
from distlip.data.tokenizer_cli import main as tokenizer_main
from distlip.data.tokenizers import EOT_TOKEN, BPETokenizer, load_tokenizer, tokenizer_from_dict, train_bpe
from distlip.errors import DataError
from distlip.trainer import Trainer

WORDS = ["the", "king", "doth", "🙂", "中文", "東京", "naïve", "straße", "😀👍", "\n", "—", "a", "rose"]
B, T = 2, 16


def make_corpus(n_files: int, per_file: int, seed: int) -> list[list[str]]:
    """Unique documents (an id prefix), some empty, with emoji, CJK and accents."""
    rng = random.Random(seed)
    files = []
    for f in range(n_files):
        docs = []
        for i in range(per_file):
            n = rng.choice([0, 0, 3, 8, 20, 40])
            docs.append("" if n == 0 else f"d{f}.{i} " + " ".join(rng.choice(WORDS) for _ in range(n)))
        files.append(docs)
    return files


def write_jsonl(directory: Path, files: list[list[str]], column: str = "text") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for f, docs in enumerate(files):
        with open(directory / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for i, doc in enumerate(docs):
                fh.write(json.dumps({column: doc, "id": i}, ensure_ascii=False) + "\n")


def write_parquet(directory: Path, files: list[list[str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for f, docs in enumerate(files):
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), directory / f"part-{f}.parquet")


def tokens_of(tok, docs: list[str]) -> list[int]:
    """The packed stream of `docs`: each non-empty one prefixed with EOT."""
    out = []
    for d in docs:
        if d:
            out += [tok.eot_id] + tok.encode(d)
    return out


def run(cfg: DataConfig, tok, rank: int, world: int, **kw) -> tuple[list, int]:
    with StreamingBatches(cfg, tok, T, B, rank=rank, world_size=world, **kw) as sb:
        batches = list(sb)
        return batches, sb.dropped_tokens


def inputs(batches) -> list[int]:
    return torch.cat([x.flatten() for x, _ in batches]).tolist()


def split_docs(stream: list[int], eot: int) -> list[tuple[int, ...]]:
    """Whole documents in a packed stream (the last, possibly cut, one left out)."""
    starts = [i for i, t in enumerate(stream) if t == eot]
    return [tuple(stream[a + 1:b]) for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(n_files=4, per_file=30, seed=0)


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe([d for f in corpus for d in f], vocab_size=300)


# ---- sharding, packing, union of tokens -------------------------------------------------------

@pytest.mark.parametrize("kind,n_files", [("jsonl", 3), ("parquet", 4)])
def test_two_ranks_split_documents_and_drop_only_the_remainder(tmp_path, corpus, bpe, kind, n_files):
    """3 files over 2 ranks: every rank reads all and keeps every 2nd document ("examples");
    4 files over 2 ranks: each rank reads whole files ("shards"). Either way the ranks' streams
    are disjoint, cover the corpus, and lose only the documented final remainder."""
    files = corpus[:n_files]
    (write_jsonl if kind == "jsonl" else write_parquet)(tmp_path, files)
    tok = bpe if kind == "parquet" else load_stream_tokenizer(DataConfig(source=kind, path=str(tmp_path)))
    cfg = DataConfig(source=kind, path=str(tmp_path), epochs=1, shuffle_buffer=0, tokenizer="char")
    docs_flat = [d for f in files for d in f]
    file_of = {d: i for i, f in enumerate(files) for d in f if d}
    seen: list[set[str]] = []
    for rank in (0, 1):
        batches, dropped = run(cfg, tok, rank, 2)
        assert all(x.shape == (B, T) and x.dtype == torch.int64 and y.shape == (B, T) for x, y in batches)
        stream = inputs(batches)
        decoded = {tok.decode(d) for d in split_docs(stream, tok.eot_id)}
        if n_files % 2:  # examples: global document i goes to rank i % 2
            mine = docs_flat[rank::2]
        else:  # shards: whole files, in file order
            owned = sorted({file_of[d] for d in decoded})
            mine = [d for i in owned for d in files[i]]
        expected = tokens_of(tok, mine)
        assert stream == expected[:len(stream)]  # nothing lost or reordered ...
        assert torch.cat([y.flatten() for _, y in batches]).tolist() == expected[1:len(stream) + 1]
        assert len(stream) + dropped == len(expected) and 1 <= dropped <= B * T  # ... but the remainder
        seen.append({d for d in mine if d})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {d for d in docs_flat if d}


@pytest.mark.parametrize("sample_by,expected", [("document", ["a b\n\nc\n", "d 🙂\n"]),
                                                ("paragraph", ["a b", "c\n", "d 🙂\n"])])
def test_text_files_become_documents(tmp_path, bpe, sample_by, expected):
    (tmp_path / "1.txt").write_text("a b\n\nc\n", encoding="utf-8")
    (tmp_path / "2.txt").write_text("d 🙂\n", encoding="utf-8")
    cfg = DataConfig(source="text", path=str(tmp_path / "*.txt"), text_sample_by=sample_by, epochs=1,
                     shuffle_buffer=0)
    with StreamingBatches(cfg, bpe, 1, 1) as sb:
        batches = list(sb)
        assert sb.dropped_tokens == 1  # one-token rows: only the final token is never an input ...
    stream = inputs(batches) + [int(batches[-1][1][-1, -1])] + [bpe.eot_id]  # ... it is the last target
    assert [bpe.decode(d) for d in split_docs(stream, bpe.eot_id)] == expected


def test_packer_puts_eot_between_documents_and_document_ids_follow():
    e = 9
    packer = Packer(batch_size=2, seq_len=2)
    for doc in ([e, 1, 2], [e, 3], [e, 4, 5, 6]):
        packer.add(np.array(doc, dtype=np.int32))
    assert packer.ready()
    x, y = packer.pop()
    assert x.tolist() == [[e, 1], [2, e]] and y.tolist() == [[1, 2], [e, 3]]
    assert document_ids(torch.from_numpy(x), e).tolist() == [[1, 1], [0, 1]]
    assert packer.ready()
    x, y = packer.pop()  # the boundary token (3) starts the next batch as an input
    assert x.tolist() == [[3, e], [4, 5]] and y.tolist() == [[e, 4], [5, 6]]
    assert not packer.ready() and packer.size == 1


def test_shuffle_buffer_snapshot_restores_the_same_future():
    docs = [np.array([i], dtype=np.int32) for i in range(50)]
    a = ShuffleBuffer(8, seed=1, rank=0)
    out_a = [a.push(d) for d in docs[:20]]
    b = ShuffleBuffer(8, seed=1, rank=0)
    b.restore(a.snapshot())
    tail = [a.push(d) for d in docs[20:]] + [a.pop() for _ in range(9)]
    assert [b.push(d) for d in docs[20:]] + [b.pop() for _ in range(9)] == tail
    emitted = [int(d[0]) for d in out_a + tail if d is not None]
    assert sorted(emitted) == list(range(50)) and emitted != sorted(emitted)


# ---- exact resume -----------------------------------------------------------------------------

def saved(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("read_batch", [3, 256])
def test_resume_after_k_batches_reproduces_the_rest_exactly(tmp_path, corpus, bpe, read_batch):
    """Two epochs, shuffle buffer and prefetch on. `read_batch=3` puts the saved dataset position
    in the middle of files; 256 keeps most documents tokenised but not yet packed. Resume points
    include the end-of-epoch drain of the shuffle buffer and the second epoch."""
    write_jsonl(tmp_path, corpus[:3])
    cfg = DataConfig(source="jsonl", path=str(tmp_path), epochs=2, shuffle_buffer=5, prefetch=3)
    full, states = [], []
    with StreamingBatches(cfg, bpe, T, B, rank=1, world_size=2, read_batch=read_batch) as sb:
        for batch in sb:
            full.append(batch)
            if len(full) == 1:
                deadline = time.time() + 5
                while not sb._queue.full() and time.time() < deadline:  # the prefetch thread runs ahead
                    time.sleep(0.01)
            states.append(saved(sb.state_dict()))
        dropped = sb.dropped_tokens
    n = len(full)
    plain, _ = run(DataConfig(source="jsonl", path=str(tmp_path), epochs=1, shuffle_buffer=0), bpe, 1, 2)
    assert inputs(full)[:200] != inputs(plain)[:200]  # the buffer did shuffle
    draining = next(k for k, st in enumerate(states, 1) if st["position"]["draining"])
    second = next(k for k, st in enumerate(states, 1) if st["position"]["epoch"] == 1)
    for k in sorted({1, draining, second, n // 2, n - 1}):
        resumed = StreamingBatches(cfg, bpe, T, B, rank=1, world_size=2, read_batch=read_batch)
        resumed.load_state_dict(states[k - 1])
        rest = list(resumed)
        assert len(rest) == n - k and resumed.dropped_tokens == dropped
        for (x, y), (xr, yr) in zip(full[k:], rest):
            assert torch.equal(x, xr) and torch.equal(y, yr)


def test_state_of_another_world_size_is_refused(tmp_path, corpus, bpe):
    write_jsonl(tmp_path, corpus[:2])
    cfg = DataConfig(source="jsonl", path=str(tmp_path))
    with StreamingBatches(cfg, bpe, T, B, rank=0, world_size=2) as sb:
        sb.next_batch()
        state = sb.state_dict()
    with pytest.raises(DataError, match="world_size: saved 2, now 1"):
        StreamingBatches(cfg, bpe, T, B).load_state_dict(state)


def test_finite_stream_ends_with_a_clear_error(tmp_path, corpus, bpe):
    write_jsonl(tmp_path, corpus[:1])
    with StreamingBatches(DataConfig(source="jsonl", path=str(tmp_path), epochs=1), bpe, T, B) as sb:
        with pytest.raises(DataError, match="ended after data.epochs=1"):
            while True:
                sb.next_batch()


# ---- validation hold-out ----------------------------------------------------------------------

def test_held_out_documents_never_reach_training(tmp_path, corpus, bpe):
    write_jsonl(tmp_path, corpus[:3])
    cfg = DataConfig(source="jsonl", path=str(tmp_path), epochs=1, val_tokens=300, shuffle_buffer=0)
    docs = [d for f in corpus[:3] for d in f if d]
    trained = set()
    for rank in (0, 1):
        with StreamingBatches(cfg, bpe, T, B, rank=rank, world_size=2) as sb:
            val = sb.held_out.tokens
            trained |= {bpe.decode(d) for d in split_docs(inputs(list(sb)), bpe.eot_id)}
    assert val.dtype == np.int64 and len(val) == 300 and val[0] == bpe.eot_id
    n_val = next(i for i in range(len(docs)) if len(tokens_of(bpe, docs[:i + 1])) >= 300) + 1
    assert val.tolist() == tokens_of(bpe, docs[:n_val])[:300]  # the source's head, in order
    assert not trained & set(docs[:n_val]) and len(trained) > len(docs) // 2


# ---- the hub code path, offline ---------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """Offline even if `datasets` was imported before the environment said so: nothing may hang."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_source_streams_a_local_dataset_directory_through_load_dataset(tmp_path, corpus, bpe, monkeypatch,
                                                                          offline):
    import datasets

    write_jsonl(tmp_path / "ds", corpus[:2])
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    hub = DataConfig(source="hub", name=str(tmp_path / "ds"), split="train", epochs=1, shuffle_buffer=0)
    local = DataConfig(source="jsonl", path=str(tmp_path / "ds"), epochs=1, shuffle_buffer=0)
    got, _ = run(hub, bpe, 0, 1)
    assert calls[0][0][0] == str(tmp_path / "ds") and calls[0][1]["streaming"] is True
    want, _ = run(local, bpe, 0, 1)
    assert inputs(got) == inputs(want)


def test_unreachable_hub_dataset_names_the_offline_alternatives(offline):
    cfg = DataConfig(source="hub", name="HuggingFaceFW/fineweb", subset="sample-10BT")
    with pytest.raises(DataError, match="hub is unreachable") as err:
        StreamingBatches(cfg, load_tokenizer("char", text="ab"), T, B)
    assert "data.source=shakespeare" in str(err.value) and "local files" in str(err.value)


def test_gpt2_tokenizer_offline_names_the_alternatives(offline, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # no cached copy either
    with pytest.raises(DataError, match="hub is unreachable") as err:
        load_tokenizer("gpt2")
    message = str(err.value)
    assert "\n" not in message and "tokenizer.json" in message and "tokenizer train" in message and "char" in message


# ---- errors -----------------------------------------------------------------------------------

def test_missing_column_lists_the_columns(tmp_path, corpus, bpe):
    write_jsonl(tmp_path, corpus[:1], column="content")
    with pytest.raises(DataError, match=r"no column 'text'.*\['content', 'id'\]"):
        StreamingBatches(DataConfig(source="jsonl", path=str(tmp_path)), bpe, T, B)


def test_no_matching_files(tmp_path, bpe):
    with pytest.raises(DataError, match="no parquet files match"):
        StreamingBatches(DataConfig(source="parquet", path=str(tmp_path / "*.parquet")), bpe, T, B)


def test_empty_sources(tmp_path, bpe):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="hold no documents"):
        StreamingBatches(DataConfig(source="jsonl", path=str(tmp_path / "a")), bpe, T, B)
    write_jsonl(tmp_path / "b", [["", "", ""]])
    with StreamingBatches(DataConfig(source="jsonl", path=str(tmp_path / "b")), bpe, T, B) as sb:
        with pytest.raises(DataError, match="no documents"):
            sb.next_batch()


def test_invalid_utf8_names_file_and_offset_or_is_skipped_with_a_warning(tmp_path, corpus, bpe, caplog):
    write_jsonl(tmp_path, corpus[:2])
    good = (tmp_path / "part-0.jsonl").read_bytes()
    cut = good.index(b"\n", 100) + 1  # a line start: no character is split
    (tmp_path / "part-9.jsonl").write_bytes(good[:cut] + b"\xff" + good[cut:])
    cfg = DataConfig(source="jsonl", path=str(tmp_path), epochs=1, shuffle_buffer=0)
    with pytest.raises(DataError, match=rf"part-9\.jsonl' is not valid UTF-8 \(invalid byte at offset {cut}\)"):
        StreamingBatches(cfg, bpe, T, B)
    with caplog.at_level(logging.WARNING, logger="distlip.data"):
        skipped, _ = run(dataclasses.replace(cfg, skip_bad_files=True), bpe, 0, 1)
    assert "skipped 1 of 3 jsonl files" in caplog.text and f"part-9.jsonl (offset {cut})" in caplog.text
    assert inputs(skipped)[:500] == tokens_of(bpe, corpus[0] + corpus[1])[:500]


def test_utf8_check_across_chunk_boundaries(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("ab中文🙂".encode() + b"x\xc3")  # 12 bytes, "x", then half of a two-byte character
    assert first_invalid_utf8(f, chunk_bytes=3) == 13
    f.write_bytes("ab中文🙂".encode() + b"\xff" + "中".encode())
    assert first_invalid_utf8(f, chunk_bytes=5) == 12
    f.write_bytes("🙂🙂".encode())
    assert first_invalid_utf8(f, chunk_bytes=3) is None


# ---- tokenizers -------------------------------------------------------------------------------

def test_bpe_round_trips_unseen_unicode_and_rebuilds_from_its_dict(bpe):
    text = "Straße 東京 🙂👍 \r\n\ttabs  and  spaces " + EOT_TOKEN
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and bpe.eot_id not in ids  # a literal EOT string is just text
    again = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert again.encode(text) == ids and again.eot_id == bpe.eot_id == 0
    assert bpe.encode_batch([text, "x"]) == [ids, bpe.encode("x")]


def test_tokenizer_train_cli_round_trips_shakespeare(tmp_path, capsys):
    """The whole packaged default corpus (38 plays, ~5M characters; ~7 s)."""
    assert tokenizer_main(["train", "--vocab-size", "2000", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vocab size: 2000" in out and "round-trip: exact on all 38 documents" in out
    tok = BPETokenizer.from_file(tmp_path)
    plays = shakespeare_plays()
    ids = tok.encode_batch(plays)
    assert [tok.decode(i) for i in ids] == plays
    assert sum(map(len, ids)) < sum(map(len, plays)) / 2  # merges were learned
    assert tokenizer_main(["train", "--vocab-size", "300", "--out", str(tmp_path), "--source", "jsonl"]) == 2


def test_char_tokenizer_streams_the_packaged_shakespeare():
    cfg = DataConfig(source="shakespeare", shuffle_buffer=4)
    tok = load_stream_tokenizer(cfg)
    with StreamingBatches(cfg, tok, 64, 4, seed=3) as sb:
        x, y = sb.next_batch()
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert tok.eot_id == tok.vocab_size - 1 and int(x.max()) < tok.vocab_size


def test_trainer_streams_jsonl_with_document_masked_attention(tmp_path):
    """The streaming pipeline end to end in the trainer: packed jsonl documents, document-causal
    attention, periodic evaluation on the held-out stream, and a certified export."""
    write_jsonl(tmp_path / "data", make_corpus(2, 60, seed=5))
    cfg = load_config("configs/smoke.yaml", [
        "data.source=jsonl", f"data.path={tmp_path / 'data'}", "data.val_tokens=2000", "data.document_mask=true",
        "train.steps=4", "train.eval_every=2", "train.progress=false", "train.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.engine.document_eot == trainer.data.tokenizer.eot_id is not None
    summary = trainer.run()
    assert summary["certified"] and math.isfinite(summary["val_loss"]) and summary["val_tokens"] >= 1000
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_rows_shorter_than_the_context(tmp_path):
    write_jsonl(tmp_path / "data", make_corpus(1, 40, seed=6))
    cfg = load_config("configs/smoke.yaml", ["data.source=jsonl", f"data.path={tmp_path / 'data'}",
                                             "data.val_tokens=500", "data.seq_len=16", "train.progress=false"])
    trainer = Trainer(cfg, tmp_path / "run")
    x, y = trainer.data.train.next_batch()
    assert x.shape == y.shape == (cfg.train.batch_size, 16) and trainer.data.val_x.shape[1] == 16
    assert math.isfinite(trainer.train_step()[0])

"""`distlip tokenizer train`: a byte-level BPE trained offline on any data source.

    distlip tokenizer train --vocab-size 8192 --out runs/tok            # the packaged Shakespeare
    distlip tokenizer train --vocab-size 50257 --out tok --source jsonl --path 'data/*.jsonl'

Writes DIR/tokenizer.json (use it as `data.tokenizer=DIR/tokenizer.json`) and prints the vocab
size, the compression in characters per token and an exact round-trip check on the training text.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from distlip.config import DataConfig, load_config
from distlip.config.checks import validate_data
from distlip.data.sources import describe, iter_documents
from distlip.data.tokenizers import train_bpe
from distlip.errors import ConfigError, run_command

# flag → DataConfig field; unset flags keep the value from --config (or the default)
_SOURCE_FLAGS = ("source", "path", "name", "subset", "split", "text_column")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distlip tokenizer", description="Tokenizer tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE with <|endoftext|> on a data source")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in all: 256 bytes + merges + <|endoftext|>")
    t.add_argument("--out", required=True, help="directory for tokenizer.json")
    t.add_argument("--config", help="YAML config whose data section names the source (flags below override it)")
    t.add_argument("--source", choices=["shakespeare", "text", "jsonl", "parquet", "hub"])
    t.add_argument("--path", help="file, glob or directory (text/jsonl/parquet)")
    t.add_argument("--name", help="hub dataset name or local dataset directory (hub)")
    t.add_argument("--subset", help="hub config name")
    t.add_argument("--split")
    t.add_argument("--text-column")
    t.add_argument("--max-chars", type=int, default=20_000_000,
                   help="train on the first N characters of the source (0: all of it); default 20M")
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen at least this often")
    return parser


def _data_config(args) -> DataConfig:
    cfg = load_config(args.config).data if args.config else DataConfig()
    flags = {k: getattr(args, k) for k in _SOURCE_FLAGS if getattr(args, k) is not None}
    cfg = dataclasses.replace(cfg, **flags)
    validate_data(cfg)
    return cfg


def _training_text(cfg: DataConfig, max_chars: int) -> list[str]:
    """Documents in source order until `max_chars` characters (the last one cut to fit)."""
    texts, total = [], 0
    for text in iter_documents(cfg):
        if max_chars and total + len(text) >= max_chars:
            texts.append(text[: max_chars - total])
            break
        texts.append(text)
        total += len(text)
    return texts


def train(args) -> int:
    cfg = _data_config(args)
    out = Path(args.out)
    # Refused before the (long) training: the nearest existing path must be a directory.
    there = next(p for p in (out, *out.parents) if p.exists())
    if not there.is_dir():
        raise ConfigError(f"--out {out}: '{there}' is a file, not a directory; give a directory for tokenizer.json")
    start = time.perf_counter()
    texts = _training_text(cfg, args.max_chars)
    tok = train_bpe(texts, args.vocab_size, min_frequency=args.min_frequency)
    seconds = time.perf_counter() - start
    encoded = tok.encode_batch(texts)
    chars, tokens = sum(map(len, texts)), sum(map(len, encoded))
    bad = next((i for i, (t, ids) in enumerate(zip(texts, encoded)) if tok.decode(ids) != t), None)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.json")
    print(f"trained a byte-level BPE on {chars:,} characters ({len(texts)} documents) of {describe(cfg)} "
          f"in {seconds:.1f} s")
    print(f"vocab size: {tok.vocab_size} (requested {args.vocab_size}); <|endoftext|> id {tok.eot_id}")
    print(f"compression: {chars / max(tokens, 1):.2f} characters per token ({tokens:,} tokens)")
    if bad is not None:
        print(f"round-trip: FAILED on document {bad}: decode(encode(text)) differs from the text")
        return 1
    print(f"round-trip: exact on all {len(texts)} documents")
    print(f"saved {out / 'tokenizer.json'}  (use: data.tokenizer={out / 'tokenizer.json'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(train, _parser().parse_args(argv))

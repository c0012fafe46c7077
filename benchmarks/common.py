"""Shared by the benchmark scripts: launch `distlip train` on 1..N processes, read its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def train(out: Path, config: str, overrides: list[str], nproc: int = 1, port: int = 29700) -> list[dict]:
    """Run training to completion and return the metrics.jsonl records (raises on failure)."""
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    args = ["--config", config, "--out", str(out), "train.progress=false", "train.tensorboard=false", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "distlip.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), "-m", "distlip.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: finished but a cap was exceeded; still report it
        raise RuntimeError(f"training failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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

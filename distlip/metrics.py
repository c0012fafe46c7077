"""Run logging: JSONL records (the interface other tools read), TensorBoard when installed,
a progress bar, and the per-phase step timer. Only the rank that owns the run directory writes."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep the information as text
    return value


class MetricsLogger:
    """`log(record)` appends one JSON object per line to DIR/metrics.jsonl and mirrors the
    numeric fields to TensorBoard (DIR/tb) when `tensorboard` is importable and enabled."""

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True, append: bool = False):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a" if append else "w", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # optional dependency
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step" and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A tqdm bar on a terminal; plain periodic lines otherwise (CI logs, SLURM output)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")
        self.total = total

    def update(self, step: int, fields: dict) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"step {step:>6}/{self.total}  {text}", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else lambda s: print(s, file=sys.stderr, flush=True))(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Step-time breakdown with synchronised timers (CUDA work is asynchronous).
PHASES = ("data", "forward", "backward", "comm", "optimizer", "constraint", "certificate")


class StepTimer:
    """Accumulates seconds per phase; `averages()` returns ms per step since the last reset."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.total = defaultdict(float)
        self.steps = 0

    @contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.total[name] += time.perf_counter() - start

    def end_step(self) -> None:
        self.steps += 1

    def averages(self) -> dict[str, float]:
        """Milliseconds per step per phase (and peak GPU memory in GiB), then reset."""
        n = max(self.steps, 1)
        out = {f"ms_{k}": 1000 * self.total.get(k, 0.0) / n for k in PHASES}
        if self.cuda:
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.total.clear()
        self.steps = 0
        return out

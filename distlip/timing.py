"""Step-time breakdown with synchronised timers (CUDA work is asynchronous)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

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

"""The mean of the weights at a run's last checkpoints (`train.average_last`).

Averaging the iterates of the end of a run (Polyak–Ruppert averaging; checkpoint averaging in
Izmailov et al., "Averaging Weights Leads to Wider Optima", 2018) keeps the certificate: every
cap distlip enforces is a convex set (a spectral-norm ball per matrix or head block, an RMS ball
per token vector), so a mean of weights that satisfy their caps satisfies them too. The mean is
certified again by exact SVD like any other weights; it is usually inside its caps, not on them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from distlip.checkpoint.files import CheckpointWarning, tag_for
from distlip.checkpoint.state import read_checkpoint


def averaged_steps(steps: int, save_every: int, k: int) -> list[int]:
    """The steps whose checkpoints `train.average_last=k` averages, oldest first: the run's last
    step and the k − 1 newest multiples of `save_every` below it."""
    if k <= 1:
        return [steps]
    below = (steps - 1) // save_every  # multiples of save_every strictly below `steps`
    return [m * save_every for m in range(below - k + 2, below + 1)] + [steps]


@torch.no_grad()
def average_checkpoints(run_dir: str | Path, steps: list[int]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Mean (float32, summed in float64) of the certified weights at the checkpoints of `run_dir`
    for `steps` that exist, and the steps found. A step whose checkpoint is gone (a preemption's
    extra checkpoint rotated it out) is left out of the mean with a CheckpointWarning."""
    paths = {s: Path(run_dir) / tag_for(s) for s in steps}
    found = [s for s in steps if paths[s].is_dir()]
    if len(found) < len(steps):
        warnings.warn(f"averaging the checkpoints of steps {', '.join(map(str, found))}: those of steps "
                      f"{', '.join(str(s) for s in steps if s not in found)} were rotated out", CheckpointWarning,
                      stacklevel=2)
    total: dict[str, torch.Tensor] = {}
    for s in found:
        for name, w in read_checkpoint(paths[s])[0].items():
            total[name] = total[name] + w.double() if name in total else w.double()
    return {n: (t / len(found)).float() for n, t in total.items()}, found

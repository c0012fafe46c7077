"""The validation protocol of the Lipschitz-transformer paper (Newhouse et al. 2025, "Training
Transformers with Enforced Lipschitz Constants", arXiv 2507.13338), reported beside distlip's
own whole-split figure so that results can be set side by side with the published ones.

The paper's Shakespeare accuracy is measured on 20 unshuffled batches of 64 stride-1 windows
of length 256 taken from the start of the validation split: window j (j = 0…1279) reads
validation tokens j…j+255 and is scored on tokens j+1…j+256, so the targets cover validation
tokens 1…1535 only. Accuracy (and loss) is the mean over batches of each batch's mean. That
stretch is easier than the split as a whole, so this figure runs several points above the
whole-split accuracy; distlip's headline stays the whole split.

Other context lengths: the window count and stride are kept (20 × 64 windows at offsets
0…1279) and the window length is the run's sequence length T, so the targets cover validation
tokens 1…1279+T. With T = 256 this is exactly the published protocol.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

BATCHES = 20
BATCH_SIZE = 64
LABEL = "paper protocol"


def protocol_windows(val_ids: np.ndarray, seq_len: int, batches: int = BATCHES,
                     batch_size: int = BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The protocol's `batches·batch_size` stride-1 windows from the start of the validation
    tokens: (inputs, targets), int64 `(batches·batch_size, seq_len)` each, in order (batch b is
    rows b·batch_size…(b+1)·batch_size−1). None when the split is too short to hold them
    (it needs `batches·batch_size + seq_len` tokens)."""
    n = batches * batch_size
    if len(val_ids) < n + seq_len:
        return None
    t = torch.from_numpy(np.ascontiguousarray(val_ids[:n + seq_len])).long()
    windows = t[torch.arange(n)[:, None] + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def batch_scores(score: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 x: torch.Tensor, y: torch.Tensor,
                 batch_size: int = BATCH_SIZE, device: torch.device | str = "cpu",
                 batch_ids: range | None = None) -> tuple[float, float, int]:
    """Sums over the protocol's batches (all, or those in `batch_ids`) of each batch's mean
    loss (nats per token) and mean top-1 accuracy, and the number of batches scored.
    `score` maps int64 `(B, T)` inputs and targets to their summed loss and number of top-1 hits
    (the trainer's is the chunked head of `distlip.loss`, so no batch's logits are held whole)."""
    n_batches = len(x) // batch_size
    loss_sum, acc_sum, count = 0.0, 0.0, 0
    for b in batch_ids if batch_ids is not None else range(n_batches):
        xb = x[b * batch_size:(b + 1) * batch_size].to(device)
        yb = y[b * batch_size:(b + 1) * batch_size].to(device)
        loss, hits = score(xb, yb)
        loss_sum += float(loss) / yb.numel()
        acc_sum += int(hits) / yb.numel()
        count += 1
    return loss_sum, acc_sum, count


def recorded_validation(model_dir: str | Path) -> dict | None:
    """The validation figures a training run stored beside an exported model (config.json's
    "validation" entry), or None when there are none."""
    meta = Path(model_dir) / "config.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("validation")
    except (json.JSONDecodeError, OSError):
        return None


def describe(seq_len: int, batches: int = BATCHES, batch_size: int = BATCH_SIZE) -> str:
    """One-line label of the protocol at this sequence length."""
    n = batches * batch_size
    return (f"{LABEL}: {batches} batches × {batch_size} stride-1 windows of {seq_len}, "
            f"targets = validation tokens 1…{n - 1 + seq_len}")

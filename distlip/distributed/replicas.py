"""Replicas that start alike: every rank builds the model from the same seed, so the weights
already agree; a fingerprint exchange (a few hundred bytes) checks that instead of sending every
weight from rank 0, and falls back to the broadcast only when they differ."""

from __future__ import annotations

import torch
import torch.distributed as dist

_PRIME = 2**61 - 1  # running sums are kept mod this: two of them add without int64 overflow
_CHUNK = 2**15  # |bits| < 2³¹, weights ≤ 2¹⁶: a chunk's weighted sum stays below 2⁶³
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}  # float64: two int32 halves


def fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Two numbers per tensor from its exact bits (int64, shape (2·len(tensors),), on the
    tensors' device): the sum of the elements' bit patterns and their sum weighted by position
    (mod 2¹⁶, + 1), both mod 2⁶¹ − 1. Equal tensors give equal fingerprints on any machine; a
    changed bit changes them."""
    out = []
    for t in tensors:
        flat = t.detach().contiguous().view(-1)
        bits = flat.view(_BITS[flat.element_size()])
        plain = torch.zeros((), dtype=torch.int64, device=t.device)
        weighted = torch.zeros_like(plain)
        for start in range(0, bits.numel(), _CHUNK):
            b = bits[start:start + _CHUNK].to(torch.int64)
            w = torch.arange(start, start + b.numel(), device=b.device, dtype=torch.int64) % 2**16 + 1
            plain = (plain + b.sum() % _PRIME) % _PRIME
            weighted = (weighted + (b * w).sum() % _PRIME) % _PRIME
        out += [plain, weighted]
    return torch.stack(out)


def agree_or_broadcast(tensors: list[torch.Tensor]) -> bool:
    """Make every rank's `tensors` equal to rank 0's. Compares fingerprints (all-reduce min and
    max); only when they differ is every tensor broadcast from rank 0. Returns whether it was."""
    lo = fingerprint(tensors)  # on the tensors' device, like the broadcast it replaces
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if torch.equal(lo, hi):
        return False
    for t in tensors:
        dist.broadcast(t, src=0)
    return True

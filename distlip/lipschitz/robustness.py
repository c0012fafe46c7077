"""Certified robustness of predictions: from a Lipschitz bound and the logits to a radius.

The perturbation δ is applied to the input embeddings and measured in the certificate's norm:
the largest per-token RMS over the window's positions (`ε`, in the units of a token vector,
whose RMS is ≤ 1). A prediction's certified radius is the largest ε under which its top-1
token provably cannot change. The derivations are in `docs/robustness.md`; in short:

- A *margin* says how far some intermediate representation may move (per-token RMS) before
  the top-1 logit can be overtaken. `norm_margin` works from the logits alone: the top pair
  moves apart by at most √(2V) times the per-token RMS of the change of the V logits, and no
  smaller factor follows from that norm. `head_margin` is tighter: it uses the head's rows,
  since z_a − z_b = (u_a − u_b)·h for the final residual h, u = logit_scale·W_head.
- A *bound* `bound_at(R)` on the map from embeddings to that representation, valid for inputs
  whose tokens have RMS ≤ R. A perturbed input has token RMS up to R = (largest embedding
  RMS) + ε, outside the certificate's usual domain (RMS ≤ 1), and its attention term grows
  with R, so the bound is taken at R.
- The prediction is certified at ε when margin > ε·bound_at(R₀ + ε).

Everything here is a pure function of tensors (no model, no process group). Margins and radii
are float64, one per prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from distlip.lipschitz.certificate import certify

BoundAt = Callable[[float], float]  # input token RMS R → Lipschitz bound on {RMS ≤ R}

# Radii are read off a geometric grid of ε, rounded down (so never above the true radius):
# 1e-12 … 1e3 in 6000 steps, i.e. at most 0.58% below it.
_GRID = np.geomspace(1e-12, 1e3, 6001)


def top_two(logits: Tensor) -> tuple[Tensor, Tensor]:
    """`logits` (N, V) → (prediction (N,) int64, margin (N,) float64 = top-1 minus top-2 logit)."""
    top = logits.double().topk(2, dim=-1)
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1]


def norm_margin(logits: Tensor) -> Tensor:
    """How far (N,) the logits may move, in per-token RMS over the V logits (the certificate's
    output norm), before the top-1 prediction can change: (top-1 − top-2) / √(2V). `logits`
    (N, V). Pair it with the bound of embeddings → logits."""
    _, margin = top_two(logits)
    return margin / math.sqrt(2 * logits.shape[-1])


@torch.no_grad()
def head_margin(logits: Tensor, head_weight: Tensor, logit_scale: float, chunk: int = 1024) -> Tensor:
    """How far (N,) the final residual stream may move, in per-token RMS, before the top-1
    prediction a can change: min over b ≠ a of (z_a − z_b) / (‖u_a − u_b‖₂·√d), u =
    `logit_scale`·`head_weight` (rows ≥ V, d). Pair it with the bound of embeddings → final
    residual stream. `logits` (N, V); pairs are formed `chunk` predictions at a time (chunk × V).
    """
    V = logits.shape[-1]
    u = head_weight[:V].double() * logit_scale
    sq = u.pow(2).sum(dim=1)  # (V,)
    out = []
    for z in logits.double().split(chunk):
        pred = z.argmax(dim=-1)
        gap = z.gather(1, pred[:, None]) - z  # (n, V), ≥ 0
        dist = (sq[pred][:, None] + sq[None, :] - 2 * u[pred] @ u.T).clamp_min(0).sqrt()
        ratio = _divide(gap, dist * math.sqrt(u.shape[1]))
        ratio.scatter_(1, pred[:, None], math.inf)  # b = a is no competitor
        out.append(ratio.amin(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _divide(gap: Tensor, factor: Tensor) -> Tensor:
    """gap / factor with the limits spelt out: a zero gap (a tie) certifies nothing; a positive
    gap over a zero factor (two logits that cannot move apart) never closes."""
    r = gap / factor.clamp_min(torch.finfo(torch.float64).tiny)
    r = torch.where(factor > 0, r, torch.full_like(r, math.inf))
    return torch.where(gap > 0, r, torch.zeros_like(r))


def certified_at(margin: Tensor, bound_at: BoundAt, input_rms: float, eps: float) -> Tensor:
    """(N,) bool: certified at `eps`, i.e. margin > eps·bound_at(input_rms + eps) (strictly: at
    equality the runner-up may tie). `input_rms`: largest token RMS of the clean inputs."""
    return margin > eps * bound_at(input_rms + eps)


def certified_radius(margin: Tensor, bound_at: BoundAt, input_rms: float) -> Tensor:
    """(N,) the largest ε (on a grid, rounded down) with margin > ε·bound_at(input_rms + ε).
    ε·bound_at(input_rms + ε) grows with ε, so the set of certified ε is an interval [0, radius).
    A margin of inf (nothing can overtake) gets radius inf; radii under 1e-12 read 0."""
    need = torch.from_numpy(np.array([e * bound_at(input_rms + e) for e in _GRID]))
    need = torch.cummax(need, 0).values  # monotone already; guards rounding in the bound
    idx = torch.searchsorted(need, margin.double().contiguous(), side="left")  # first grid ε not certified
    grid = torch.from_numpy(np.concatenate(([0.0], _GRID)))
    radius = grid[idx]  # grid[idx] = _GRID[idx − 1]: the last certified grid ε (0 if none)
    return torch.where(torch.isinf(margin), torch.full_like(radius, math.inf), radius)


def summarize(correct: Tensor, certified: list[Tensor], radius: Tensor | None) -> dict:
    """Clean accuracy, certified accuracy at each ε (correct and certified) and the median
    certified radius of the correct predictions (lower median). `correct` (N,) bool;
    `certified`: one (N,) bool per ε; `radius` (N,) or None."""
    n = max(correct.numel(), 1)
    good = radius[correct] if radius is not None else None
    return {
        "predictions": correct.numel(),
        "clean_accuracy": correct.sum().item() / n,
        "certified_accuracy": [(c & correct).sum().item() / n for c in certified],
        "median_radius": (good.median().item() if good.numel() else 0.0) if good is not None else None,
    }


def bounds_at(norms: dict[str, float], cfg) -> tuple[BoundAt, BoundAt]:
    """(embeddings → logits, embeddings → final residual stream) bounds as functions of the
    inputs' largest token RMS R, from the certificate's norm table (`exact_norms`, head blocks
    included) and the `ModelConfig`. The certificate's domain is tokens of RMS ≤ max(1, embed),
    so passing R as `embed` gives the bound on that ball; the body is the certificate with its
    head factor divided out (a unit head: its network bound over its head factor)."""
    body_norms = {**norms, "head.weight": 1.0}

    def body(R: float) -> float:
        c = certify(body_norms, R, cfg)
        return c.network_bound / c.head

    return (lambda R: certify(norms, R, cfg).network_bound), body

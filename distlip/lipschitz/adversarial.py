"""An attack on predictions: projected gradient ascent in embedding space.

The threat model is the certificate's: a perturbation δ of the input embeddings (B, T, d)
with per-token RMS ≤ ε at every attacked position (zero elsewhere). One δ per window attacks
all of that window's predictions at once; a prediction counts as broken as soon as any iterate
of any restart changes it away from the label. Every iterate lies inside the ball, so each
break is a real counterexample and empirical robust accuracy is an upper bound on the true
robust accuracy (and never below the certified accuracy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distlip.lipschitz.attack import clip_to_ball, token_rms

LOSSES = ("margin", "ce")


def project(delta: Tensor, eps: float, positions: Tensor | None = None) -> Tensor:
    """Nearest point of the ball {per-token RMS ≤ `eps` on `positions`, 0 elsewhere}: the ball
    is a product of per-token balls, so each token vector is scaled down on its own.
    `delta` (B, T, d); `positions` (T,) or (B, T) bool, None for every position."""
    delta = clip_to_ball(delta, eps)
    return delta if positions is None else delta * positions[..., None].to(delta.dtype)


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, T, V), (B, T) → (B, T): label logit minus the best other logit (> 0: correct)."""
    own = logits.gather(-1, labels[..., None]).squeeze(-1)
    others = logits.scatter(-1, labels[..., None], float("-inf"))
    return own - others.amax(dim=-1)


def attack(f: Callable[[Tensor], Tensor], h: Tensor, labels: Tensor, eps: float, *, steps: int = 20,
           restarts: int = 2, loss: str = "margin", positions: Tensor | None = None,
           seed: int = 0) -> Tensor:
    """Which predictions survive the attack: (B, T) bool, True where the clean prediction and
    every iterate tried predict `labels`.

    `f`: embeddings (B, T, d) → logits (B, T, V); `h` (B, T, d) the clean embeddings; `labels`
    (B, T) int64; `eps` > 0 the per-token RMS budget. Restart 0 starts at δ = 0, the others at
    a random point of the ball. Each step moves every token along its own gradient normalised
    to RMS 1 (steepest ascent for this ball), by a step that shrinks from ε/2 to ε/20, then
    projects. `loss`: "margin" pushes down the label's margin, "ce" pushes up cross-entropy;
    either counts only the predictions not yet broken, so the search moves on to the rest.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    gen = torch.Generator().manual_seed(seed)
    h = h.detach()
    tiny = torch.finfo(h.dtype).tiny
    with torch.no_grad():
        alive = margins(f(h), labels) > 0
    for r in range(restarts):
        delta = torch.zeros_like(h)
        if r > 0:
            noise = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h)
            scale = eps * torch.rand(h.shape[:-1] + (1,), generator=gen, dtype=torch.float64).to(h)
            delta = project(noise / token_rms(noise).clamp_min(tiny) * scale, eps, positions)
        for s in range(steps):
            if not alive.any():
                return alive
            delta.requires_grad_(True)
            logits = f(h + delta)
            m = margins(logits, labels)
            alive = alive & (m.detach() > 0)
            if loss == "margin":
                objective = -(m * alive).sum()
            else:
                ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
                objective = (ce.view_as(m) * alive).sum()
            (grad,) = torch.autograd.grad(objective, delta)
            step = eps * (0.5 - 0.45 * s / max(steps - 1, 1))
            with torch.no_grad():
                delta = project(delta + step * grad / token_rms(grad).clamp_min(tiny), eps, positions)
        with torch.no_grad():
            alive = alive & (margins(f(h + delta), labels) > 0)
    return alive

"""Stop a run whose training loss has run away instead of letting it finish as noise.

A model that predicts the uniform distribution over the vocabulary scores ln(vocab) nats per
token (the zero-initialised head starts exactly there), so a loss that stays above ln(vocab)
after the first steps means the weights have left the region where training helps: without a
constraint and at too large a step size they grow until the loss explodes. The guard raises
after `patience` consecutive logged losses above ln(vocab), past `grace` steps, with the
changes that usually fix it. The trainer checks before any checkpoint is written for that
step, so saved files are left as they were.
"""

from __future__ import annotations

import math

from distlip.errors import DistlipError


class TrainingDiverged(DistlipError):
    """The training loss stayed above ln(vocab) for too long."""


class DivergenceGuard:
    """`check(step, loss)` on every logged loss; `patience` 0 turns the guard off."""

    def __init__(self, vocab_size: int, patience: int, grace: int, lr: float, method: str):
        self.limit = math.log(vocab_size)
        self.patience, self.grace = patience, grace
        self.lr, self.method = lr, method
        self.run = 0  # consecutive logged losses above the limit

    def check(self, step: int, loss: float) -> None:
        if self.patience <= 0 or step <= self.grace:
            return
        self.run = self.run + 1 if loss > self.limit else 0
        if self.run >= self.patience:
            fix = ("use a weight constraint (constraint.method=soft_cap or hard_cap)" if self.method in ("none", "")
                   else "tighten the constraint (constraint.sigma_max)")
            raise TrainingDiverged(
                f"training diverged: loss {loss:.3f} at step {step} has stayed above ln(vocab) = {self.limit:.3f} "
                f"for {self.run} logged steps; lower optim.lr (now {self.lr:g}) or {fix}. "
                "Saved files were left untouched.")

"""The local-step outer loop (`compression.sync_every` H > 1; docs/compression.md#the-outer-loop):
an `Exchange` in the DiLoCo / MuLoCo family, with the constraint after every step.

Between exchanges every rank steps every distlip-held tensor on its own gradient (Muon with
its own momentum, then the constraint): owner-computes does not apply, so each rank runs the
optimiser for the whole model. At the end of a round (every H steps, and at the last step of
training) the ranks exchange pseudo-gradients and all take the same outer step:

    Δ_m = x − w_m                       (round-start weights minus rank m's local weights)
    Δ̄ = mean_m C(Δ_m)                   (the `compression:` estimator: dense, EF14, EF21, ...)
    b ← μ·b + Δ̄;  x ← x − η·(Δ̄ + μ·b)    (Nesterov, as torch SGD; η = outer_lr, μ = outer_momentum)
    x ← constrain(x);  w_m ← x           (every rank starts the next round from the same x)

Every rank computes the same x bit for bit (an all-reduce, or gathered messages summed in rank
order), so nothing is sent back. The pseudo-gradients go through the estimator with every rank
receiving every mean (`owners=None`); bytes are counted as the per-step exchange's are.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from distlip.compress import ByteCounter, build, check
from distlip.config.schema import CompressionConfig
from distlip.distributed.exchange import GradOf, TimedComm, traffic_fields
from distlip.errors import CheckpointError
from distlip.optim import nesterov_outer_update

# This exchange's fields in its state dict; the rest are the estimator's.
OWN_FIELDS = ("master", "local", "outer_momentum")


class OuterLoop:
    """One rank's outer loop over the module weights `params` (its local weights w).

    names: the distlip-held tensors, in one order shared by every rank; owned: the ones this
    rank writes the round-start weights of in a checkpoint; total: training steps (the last
    one ends a round); constrain: puts the new round-start weights {name: tensor} under their
    caps in place, identically on every rank; comm: the collectives (a `compress.Comm`).
    `masters` is empty (each rank's optimiser steps its module weights); `global_weights` holds x.
    """

    carries_momentum = False

    def __init__(self, section: CompressionConfig, params: dict[str, torch.nn.Parameter], names: list[str],
                 owned: list[str], *, total: int, constrain: Callable[[dict[str, Tensor]], None], comm) -> None:
        check(section)
        self.params, self.names, self.owned, self.total = params, names, owned, total
        self.every, self.lr, self.mu = section.sync_every, section.outer_lr, section.outer_momentum
        self.constrain = constrain
        self.counter = ByteCounter()
        self.comm = TimedComm(comm)
        self.uplink, _ = build(section, self.comm, self.counter)
        self.masters: dict[str, Tensor] = {}
        self.previous: dict[str, Tensor] = {}
        self.global_weights = {n: params[n].data.float().clone() for n in names}
        self.momentum: dict[str, Tensor] = {}  # outer Nesterov buffers b, from the first round on
        self._steps = self._rounds = 0
        self._exchange_seconds = 0.0
        self._totals = {"uplink_bytes_total": 0.0, "downlink_bytes_total": 0.0}

    def ends_round(self, step: int) -> bool:
        """Whether optimiser step `step` (0-based) is the last of its round: every H steps, and
        the last step of training, so the run ends on global weights."""
        return (step + 1) % self.every == 0 or step + 1 == self.total

    def needs_previous(self, step: int) -> bool:
        return False

    def gradients(self, grad_of: GradOf, step: int, previous: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """This rank's own gradient of every tensor: a local step sends nothing."""
        self._steps += 1
        return {n: grad_of(n) for n in self.names}

    @torch.no_grad()
    def share(self, step: int) -> None:
        """At the end of a round: the pseudo-gradient exchange, the outer step, the constraint,
        and every rank's local weights set to the new x. Otherwise nothing."""
        if not self.ends_round(step):
            return
        start = time.perf_counter()
        x, w = self.global_weights, self.params
        deltas = {n: x[n] - w[n].data.float() for n in self.names}
        mean = self.uplink.aggregate_many(deltas, step=step)
        self._exchange_seconds += time.perf_counter() - start
        for n in self.names:
            b = self.momentum.setdefault(n, torch.zeros_like(x[n]))
            nesterov_outer_update(x[n], mean[n], b, lr=self.lr, momentum=self.mu)
        self.constrain(x)
        for n in self.names:
            w[n].data.copy_(x[n])
        self._rounds += 1

    def master_weights(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """The round-start weights x (the last global model), the same on every rank."""
        return {**weights, **{n: x.clone() for n, x in self.global_weights.items()}}

    def log_fields(self) -> dict[str, float]:
        """As `CompressedExchange.log_fields` (per step since the last call, the round's bytes
        spread over its steps), plus `outer_rounds`: rounds completed since the last call."""
        out = traffic_fields(self.counter, self._totals, max(self._steps, 1), self.comm.seconds,
                             self._exchange_seconds)
        out["outer_rounds"] = self._rounds
        self.counter.reset()
        self.comm.seconds = self._exchange_seconds = 0.0
        self._steps = self._rounds = 0
        return out

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """{name: {field: tensor}} for this rank: "master" (x) for the tensors it `owned`,
        "local" (its own w) and "outer_momentum" (b, the same on every rank) for every tensor,
        and the estimator's fields (error feedback and reference points, per rank)."""
        out = {name: dict(fields) for name, fields in self.uplink.state_dict().items()}
        for n in self.names:
            fields = out.setdefault(n, {})
            fields["local"] = self.params[n].data
            if n in self.momentum:
                fields["outer_momentum"] = self.momentum[n]
        for n in self.owned:
            out[n]["master"] = self.global_weights[n]
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Inverse of `state_dict`, merged by name: "master" of every tensor (from whichever
        rank saved it); without "local" a rank starts from x, without "outer_momentum" from
        b = 0, without estimator fields with a dense round (after a change of world size)."""
        for n in self.names:
            fields = state.get(n, {})
            if "master" not in fields:
                raise CheckpointError(f"outer-loop state has no round-start weights for {n!r}")
            self.global_weights[n].copy_(fields["master"])
            self.params[n].data.copy_(fields.get("local", fields["master"]))
            if "outer_momentum" in fields:
                self.momentum[n] = fields["outer_momentum"].to(self.global_weights[n].device).clone()
        estimator = {n: {k: t.to(self.params[n].device) for k, t in f.items() if k not in OWN_FIELDS}
                     for n, f in state.items() if n in self.params and set(f) - set(OWN_FIELDS)}
        self.uplink.load_state_dict(estimator)

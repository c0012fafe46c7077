"""How one rank's step communicates: the `Exchange` strategies the engine's step runs through
(docs/method.md#owner-computes, docs/compression.md#formulas).

The step is the same whatever the strategy (`distributed.engine.Engine.step`)::

    grads = exchange.gradients(grad_of, step, previous)   # the aggregate of every tensor this rank steps
    ... optimise and constrain those tensors (the `masters` where the exchange keeps them) ...
    exchange.share(step)                                  # every rank's module weights brought up to date

- `DenseExchange` (compression off): owner-computes. Each tensor's gradients are reduced to
  its owner only, the owner steps it, then broadcasts the new weights; replicas stay identical.
- `CompressedExchange` (the `compression:` block on):

  - uplink: every rank passes its local gradient of every distlip-held tensor (the matrices,
    and the embedding when it takes the colnorm step) through the estimator, in one fixed
    order; the messages travel in one reduce-scatter and one all-to-all, so each owner alone
    computes the aggregate of its tensors and steps Muon with it. The gradient is compressed,
    never Muon's orthogonalised update (Newton–Schulz is nonlinear). MARINA on one batch also
    takes this rank's gradients at the previous weights (a second backward pass, `previous`).
  - downlink (EF21-P, when `compression.downlink` is not identity): the owner keeps the master
    x of each tensor it owns (stepped and constrained there, and the certified weights) and
    broadcasts C(x⁺ − w), one broadcast per owner; every rank sets its module weights
    w ← w + C(x⁺ − w), so gradients are taken at w. Without it the owners broadcast x⁺ densely
    and w = x.

  - lowrank (`compress.lowrank`): rank-r factors of every matrix in two all-reduces; every rank
    gets every aggregate, steps every tensor alike, and nothing is sent back.

Tensors DeepSpeed holds (the embedding under optim.embed=adam) stay dense: DeepSpeed reduces
their gradients itself, and those bytes are not counted here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from distlip.compress import ByteCounter, EF21Momentum, LowRank, Marina, TorchComm, build, check
from distlip.compress.accounting import DOWNLINK, broadcast_bytes
from distlip.config.schema import CompressionConfig
from distlip.distributed.sharding import OwnershipPlan
from distlip.errors import CheckpointError

GradOf = Callable[[str], Tensor]  # a tensor's name → this rank's local fp32 gradient of it


class Exchange(Protocol):
    """One rank's communication for the tensors distlip steps (the engine's only view of it).

    `masters`: the tensors this rank's optimiser steps in place of the module weights, by name
    ({}: it steps the module weights); `carries_momentum`: the aggregate is already a momentum,
    so Muon must not smooth it again; `previous`: the weights a second backward pass runs at
    (MARINA on one batch; else {})."""

    masters: dict[str, Tensor]
    carries_momentum: bool
    previous: dict[str, Tensor]

    def needs_previous(self, step: int) -> bool:
        """Whether `gradients` at `step` needs this rank's gradients at the `previous` weights."""
        ...

    def gradients(self, grad_of: GradOf, step: int, previous: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The gradient to step each tensor this rank steps with, by name (a collective)."""
        ...

    def share(self, step: int) -> None:
        """After the optimiser and the constraint: every rank's module weights brought up to date (a collective)."""
        ...

    def master_weights(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """`weights` (the module weights by name) with every distlip-held tensor's certified
        value in place, identical on every rank (a collective where they live apart)."""
        ...

    def log_fields(self) -> dict[str, float]:
        """Figures for the metrics record since the last call ({} when there are none)."""
        ...

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """This rank's state, {name: {field: tensor}} ({} when there is none)."""
        ...

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None: ...


@torch.no_grad()
def broadcast_from_owners(params: dict[str, torch.nn.Parameter], plan: OwnershipPlan, rank: int,
                          broadcast: Callable[[Tensor, int], None]) -> None:
    """Every owner broadcasts its tensors' module weights, flattened into one message per owner
    (`broadcast(flat, src)`, in place); afterwards every rank holds the owners' weights."""
    for src in range(plan.world_size):
        names = plan.owned_by(src)
        if not names:
            continue
        flat = torch.cat([params[n].data.reshape(-1) for n in names])
        broadcast(flat, src)
        if src != rank:
            for n, chunk in zip(names, flat.split([params[n].numel() for n in names])):
                params[n].data.copy_(chunk.view_as(params[n]))


class DenseExchange:
    """Owner-computes with dense collectives: each tensor's mean gradient is reduced to its owner
    only (one reduce per owner), the owner steps it, and broadcasts the result (one broadcast per
    owner). No rank repeats another's work; with one process nothing is sent."""

    carries_momentum = False

    def __init__(self, params: dict[str, torch.nn.Parameter], plan: OwnershipPlan, rank: int) -> None:
        self.params, self.plan, self.rank = params, plan, rank
        self.masters: dict[str, Tensor] = {}
        self.previous: dict[str, Tensor] = {}

    def needs_previous(self, step: int) -> bool:
        return False

    @torch.no_grad()
    def gradients(self, grad_of: GradOf, step: int, previous: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Mean gradient of every tensor this rank owns (each reduced only to its owner)."""
        world = self.plan.world_size
        if world == 1:
            return {n: grad_of(n) for n in self.plan.owned_by(self.rank)}
        mine: dict[str, Tensor] = {}
        for rank in range(world):
            names = self.plan.owned_by(rank)
            if not names:
                continue
            flat = torch.cat([grad_of(n).reshape(-1) for n in names])
            dist.reduce(flat, dst=rank, op=dist.ReduceOp.SUM)
            if rank == self.rank:
                flat /= world
                sizes = [self.params[n].numel() for n in names]
                mine = {n: g.view_as(self.params[n]) for n, g in zip(names, flat.split(sizes))}
        return mine

    def share(self, step: int) -> None:
        if self.plan.world_size > 1:
            broadcast_from_owners(self.params, self.plan, self.rank, lambda flat, src: dist.broadcast(flat, src=src))

    def master_weights(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        return weights

    def log_fields(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        pass


class TimedComm:
    """A `Comm` that also totals the seconds spent inside collectives, so that the rest of
    the exchange's time is compression, decompression and estimator arithmetic. On a GPU it
    waits for the device before and after each collective (NCCL calls return before the
    transfer ends), so the split is real there too."""

    def __init__(self, comm: TorchComm) -> None:
        self.comm, self.world_size, self.rank = comm, comm.world_size, comm.rank
        self.seconds = 0.0

    def _timed(self, fn, tensor: Tensor, *args):
        cuda = tensor.is_cuda
        if cuda:
            torch.cuda.synchronize(tensor.device)
        start = time.perf_counter()
        try:
            return fn(tensor, *args)
        finally:
            if cuda:
                torch.cuda.synchronize(tensor.device)
            self.seconds += time.perf_counter() - start

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return self._timed(self.comm.all_reduce_sum, tensor)

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        return self._timed(self.comm.all_reduce_max, tensor)

    def reduce_scatter_sum(self, tensor: Tensor) -> Tensor:
        return self._timed(self.comm.reduce_scatter_sum, tensor)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return self._timed(self.comm.all_gather, tensor)

    def all_to_all(self, tensor: Tensor, send_sizes: list[int], recv_sizes: list[int]) -> Tensor:
        return self._timed(self.comm.all_to_all, tensor, send_sizes, recv_sizes)

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        return self._timed(self.comm.broadcast, tensor, src)


def traffic_fields(counter: ByteCounter, totals: dict[str, float], steps: int, collective_seconds: float,
                   exchange_seconds: float) -> dict[str, float]:
    """Per rank, averaged over `steps`: bytes sent / received / the busier of the two
    (`uplink_bytes`, `downlink_bytes`), the dense exchange's (`dense_bytes`, both directions),
    their ratios (`compression_ratio` overall, `uplink_ratio`), cumulative totals (`totals`,
    updated here), and ms spent in the exchange's collectives vs compressing, decompressing and
    estimator arithmetic (`ms_collective`, `ms_codec`)."""
    per_step = {k: v / steps for k, v in counter.as_dict().items()}
    totals["uplink_bytes_total"] += counter.uplink_bytes
    totals["downlink_bytes_total"] += counter.downlink_bytes
    moved = per_step["uplink_bytes"] + per_step["downlink_bytes"]
    up = per_step["uplink_bytes"]
    return {**per_step, "compression_ratio": per_step["dense_bytes"] / moved if moved else 1.0,
            "uplink_ratio": counter.uplink.dense_volume / counter.uplink_bytes if up else 1.0,
            **totals,
            "ms_collective": 1000 * collective_seconds / steps,
            "ms_codec": 1000 * (exchange_seconds - collective_seconds) / steps}


class CompressedExchange:
    """Uplink estimator, optional downlink, byte and time accounting for one rank (an `Exchange`).

    params: the module's parameters by name (the working copies w every forward reads);
    plan: who owns which distlip-held tensor (its key order is the exchange order).
    `masters` holds, with a compressed downlink, the x of every tensor this rank owns (fp32,
    shaped like the parameter): the tensors the owner steps and constrains. Without one it is
    empty and the owner steps the module weights themselves. `previous` holds, for MARINA on
    one batch, every tensor's working copy before the last step (`remember`): the weights the
    second backward pass runs at.
    """

    def __init__(self, section: CompressionConfig, params: dict[str, torch.nn.Parameter], plan: OwnershipPlan,
                 rank: int) -> None:
        self.params, self.plan, self.rank = params, plan, rank
        self.counter = ByteCounter()
        self.comm = TimedComm(TorchComm())
        check(section)  # as when the section was loaded; the estimators' constructors run in the same order
        self.uplink, self.downlink = build(section, self.comm, self.counter)
        # lowrank's all-reduce gives every rank every aggregate: every rank steps every tensor.
        self.replicated = isinstance(self.uplink, LowRank)
        self.masters = {n: params[n].data.clone() for n in plan.owned_by(rank)} if self.downlink else {}
        # EF21 with η < 1 aggregates momentum rather than gradients (see Engine._optim_config).
        self.carries_momentum = isinstance(self.uplink, EF21Momentum) and self.uplink.eta < 1.0
        same_batch = isinstance(self.uplink, Marina) and self.uplink.same_batch
        self.previous = {n: torch.empty_like(params[n].data) for n in plan.owner} if same_batch else {}
        self._remembered = False
        self._steps = 0
        self._exchange_seconds = 0.0
        self._totals = {"uplink_bytes_total": 0.0, "downlink_bytes_total": 0.0}

    def needs_previous(self, step: int) -> bool:
        """Whether `gradients` at `step` needs this rank's gradients at the `previous` weights."""
        sizes = {n: self.params[n].numel() for n in self.plan.owner}
        return bool(self.previous) and self.uplink.needs_previous(sizes, step)

    @torch.no_grad()
    def remember(self, weights: dict[str, Tensor] | None = None) -> None:
        """Keep `weights` (default: the current working copies) as the next step's `previous`;
        a no-op unless MARINA runs on one batch."""
        for name, before in self.previous.items():
            before.copy_(self.params[name].data if weights is None else weights[name])
        self._remembered = True

    @torch.no_grad()
    def gradients(self, grad_of: GradOf, step: int, previous: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The aggregate gradient of every tensor this rank owns (every tensor when `replicated`).
        `grad_of(name)` is this rank's local fp32 gradient; `previous` its gradients at the
        `previous` weights on the same batch, when `needs_previous`. Every rank compresses every
        tensor; one reduce-scatter and one all-to-all (`transport.mean_many`) bring each owner the
        messages of its tensors (lowrank: two all-reduces bring every rank every aggregate).
        The working copies, not yet stepped, are remembered for the next step's second pass."""
        start = time.perf_counter()
        grads = {name: grad_of(name) for name in self.plan.owner}
        mine = self.uplink.aggregate_many(grads, step=step, owners=self.plan.owner, previous=previous)
        self._exchange_seconds += time.perf_counter() - start
        self._steps += 1
        self.remember()
        return mine

    @torch.no_grad()
    def share(self, step: int) -> None:
        """With the EF21-P downlink, bring every rank's working copies w to within C of the
        owners' x⁺; without, the owners broadcast x⁺ whole. One broadcast per owner either way;
        none when `replicated` (every rank stepped every tensor itself)."""
        if self.replicated:
            return
        if self.downlink is None:
            broadcast_from_owners(self.params, self.plan, self.rank, self._broadcast_dense)
            return
        start = time.perf_counter()
        self.downlink.sync_many({name: (self.params[name].data, self.masters.get(name), owner)
                                 for name, owner in self.plan.owner.items()}, step=step)
        self._exchange_seconds += time.perf_counter() - start

    def _broadcast_dense(self, flat: Tensor, src: int) -> None:
        """One owner's dense broadcast of its flat tensors, timed and counted like the rest of the exchange."""
        start = time.perf_counter()
        self.comm.broadcast(flat, src)
        sent, received = broadcast_bytes(flat.numel() * flat.element_size(), self.comm.world_size, src == self.rank)
        self.counter.add(DOWNLINK, sent=sent, received=received, dense_sent=sent, dense_received=received)
        self._exchange_seconds += time.perf_counter() - start

    @torch.no_grad()
    def master_weights(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """Under a compressed downlink each owner broadcasts its masters x (the certified
        weights); otherwise the module weights are the masters."""
        if self.downlink is None:
            return weights
        weights = dict(weights)
        for name, owner in self.plan.owner.items():
            x = self.masters[name].clone() if owner == self.rank else torch.empty_like(self.params[name].data)
            dist.broadcast(x, src=owner)
            weights[name] = x
        return weights

    def log_fields(self) -> dict[str, float]:
        """`traffic_fields` since the last call."""
        out = traffic_fields(self.counter, self._totals, max(self._steps, 1), self.comm.seconds,
                             self._exchange_seconds)
        self.counter.reset()
        self.comm.seconds = self._exchange_seconds = 0.0
        self._steps = 0
        return out

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """{name: {field: tensor}} for this rank: the uplink estimator's fields for every
        distlip-held tensor (see `distlip.compress.estimators`) and, with a compressed
        downlink, "master" (x) for the tensors this rank owns."""
        out = {name: dict(fields) for name, fields in self.uplink.state_dict().items()}
        for name, x in self.masters.items():
            out.setdefault(name, {})["master"] = x
        if self._remembered:
            for name, before in self.previous.items():
                out.setdefault(name, {})["previous"] = before
        return out

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Inverse of `state_dict`. Every rank must pass estimator fields for the same names (or
        none: then every estimator restarts with a dense round); masters are taken by name, so
        after a change of world size a dict merged over the old ranks' masters works."""
        own = {"master", "previous"}  # the exchange's fields; the rest are the estimator's
        # Checkpoints load on the CPU: the estimator's fields go back to the device they work on.
        estimator = {n: {k: t.to(self.params[n].device) for k, t in f.items() if k not in own}
                     for n, f in state.items() if set(f) - own}
        if self.previous and not all("previous" in state.get(n, {}) for n in self.previous):
            estimator = {}  # no previous weights to take the second pass at: restart with a dense round
        self.uplink.load_state_dict(estimator)
        if estimator and self.previous:
            self.remember({n: state[n]["previous"] for n in self.previous})
        for name, x in self.masters.items():
            saved = state.get(name, {}).get("master")
            if saved is None:
                raise CheckpointError(f"compression state has no master weights for {name!r}, "
                                      f"which rank {self.rank} owns")
            x.copy_(saved)  # in place: the optimiser holds this tensor

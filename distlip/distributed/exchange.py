"""Compressed communication for the tensors distlip steps itself (docs/method.md#muon, docs/compression.md#formulas).

`CompressedExchange` replaces the engine's dense reduce-to-owner and broadcast when the
`compression:` block is on:

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

import torch
from torch import Tensor

from distlip.compress import ByteCounter, EF21Momentum, LowRank, Marina, TorchComm, build, check
from distlip.compress.accounting import DOWNLINK, broadcast_bytes
from distlip.config.schema import CompressionConfig
from distlip.distributed.sharding import OwnershipPlan
from distlip.errors import CheckpointError


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

    def reduce_scatter_sum(self, tensor: Tensor) -> Tensor:
        return self._timed(self.comm.reduce_scatter_sum, tensor)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return self._timed(self.comm.all_gather, tensor)

    def all_to_all(self, tensor: Tensor, send_sizes: list[int], recv_sizes: list[int]) -> Tensor:
        return self._timed(self.comm.all_to_all, tensor, send_sizes, recv_sizes)

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        return self._timed(self.comm.broadcast, tensor, src)


class CompressedExchange:
    """Uplink estimator, optional downlink, byte and time accounting for one rank.

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
        # Every rank gets every aggregate (lowrank's all-reduce): every rank steps every tensor.
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
    def gradients(self, grad_of, step: int, previous: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The aggregate gradient of every tensor this rank owns (every tensor when `replicated`).
        `grad_of(name)` is this rank's local fp32 gradient; `previous` its gradients at the
        `previous` weights on the same batch, when `needs_previous`. Every rank compresses every
        tensor; one reduce-scatter and one all-to-all (`transport.mean_many`) bring each owner the
        messages of its tensors (lowrank: two all-reduces bring everyone every aggregate)."""
        start = time.perf_counter()
        grads = {name: grad_of(name) for name in self.plan.owner}
        mine = self.uplink.aggregate_many(grads, step=step, owners=self.plan.owner, previous=previous)
        self._exchange_seconds += time.perf_counter() - start
        self._steps += 1
        return mine

    @torch.no_grad()
    def share(self, step: int) -> None:
        """EF21-P downlink: bring every rank's working copies w to within C of the owners' x⁺
        (one broadcast per owner)."""
        start = time.perf_counter()
        self.downlink.sync_many({name: (self.params[name].data, self.masters.get(name), owner)
                                 for name, owner in self.plan.owner.items()}, step=step)
        self._exchange_seconds += time.perf_counter() - start

    def broadcast_dense(self, flat: Tensor, src: int) -> None:
        """One owner's dense broadcast of its flat tensors (the engine's path without a
        compressed downlink), timed and counted like the rest of the exchange."""
        start = time.perf_counter()
        self.comm.broadcast(flat, src)
        sent, received = broadcast_bytes(flat.numel() * flat.element_size(), self.comm.world_size, src == self.rank)
        self.counter.add(DOWNLINK, sent=sent, received=received, dense_sent=sent, dense_received=received)
        self._exchange_seconds += time.perf_counter() - start

    def log_fields(self) -> dict[str, float]:
        """Per rank, averaged per step since the last call: bytes sent / received / the busier of
        the two (`uplink_bytes`, `downlink_bytes`), the dense exchange's (`dense_bytes`, both
        directions), their ratios (`compression_ratio` overall, `uplink_ratio`), cumulative
        totals, and ms spent in the exchange's collectives vs compressing, decompressing and
        estimator arithmetic (`ms_collective`, `ms_codec`)."""
        n = max(self._steps, 1)
        per_step = {k: v / n for k, v in self.counter.as_dict().items()}
        self._totals["uplink_bytes_total"] += self.counter.uplink_bytes
        self._totals["downlink_bytes_total"] += self.counter.downlink_bytes
        moved = per_step["uplink_bytes"] + per_step["downlink_bytes"]
        up = per_step["uplink_bytes"]
        out = {**per_step, "compression_ratio": per_step["dense_bytes"] / moved if moved else 1.0,
               "uplink_ratio": self.counter.uplink.dense_volume / self.counter.uplink_bytes if up else 1.0,
               **self._totals,
               "ms_collective": 1000 * self.comm.seconds / n,
               "ms_codec": 1000 * (self._exchange_seconds - self.comm.seconds) / n}
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

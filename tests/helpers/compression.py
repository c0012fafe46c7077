"""Compression test rigs: M ranks as threads of one process over an in-memory `Comm`, and
one-tensor forms of the estimator and downlink calls (the library only has the bucketed ones)."""

from __future__ import annotations

import threading

import torch

from distlip.compress import Downlink, Estimator
from distlip.compress.accounting import ring_all_reduce_bytes


def aggregate(estimator: Estimator, name: str, grad: torch.Tensor, *, step: int) -> torch.Tensor:
    """`estimator.aggregate_many` for one tensor, on every rank (a new tensor shaped like `grad`)."""
    return estimator.aggregate_many({name: grad}, step=step)[name]


def sync(downlink: Downlink, name: str, weights: torch.Tensor, master: torch.Tensor | None, *, step: int,
         owner: int) -> torch.Tensor:
    """`downlink.sync_many` for one tensor; returns `weights`, updated in place."""
    downlink.sync_many({name: (weights, master, owner)}, step=step)
    return weights


class ThreadGroup:
    """M workers in one process, one thread each; `comm(rank)` is that worker's `Comm`.

    Slots alternate between two buffers, so one barrier per collective suffices: a rank can
    only overwrite a buffer after the next barrier, by which time everyone has read it.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.slots = [[None] * world_size, [None] * world_size]
        self.barrier = threading.Barrier(world_size)

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def run(self, worker) -> list:
        """Run `worker(comm)` on every rank concurrently; its return values in rank order."""
        results: list = [None] * self.world_size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = worker(self.comm(rank))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadComm:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = group.world_size
        self.calls = 0
        self.moved = [0.0, 0.0]  # bytes this rank really sent and received
        self.log: list[str] = []  # the collectives called, in order

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        slots = self.group.slots[self.calls % 2]
        self.calls += 1
        slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        return list(slots)

    def all_reduce_sum(self, tensor):
        self.log.append("all_reduce_sum")
        self.moved = [m + ring_all_reduce_bytes(tensor.nbytes, self.world_size) for m in self.moved]
        parts = self._exchange(tensor)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return tensor.copy_(total)

    def all_reduce_max(self, tensor):
        self.log.append("all_reduce_max")
        self.moved = [m + ring_all_reduce_bytes(tensor.nbytes, self.world_size) for m in self.moved]
        return tensor.copy_(torch.stack(self._exchange(tensor)).amax(0))

    def all_gather(self, tensor):
        self.log.append("all_gather")
        return self._exchange(tensor)

    def broadcast(self, tensor, src):
        self.log.append("broadcast")
        return tensor.copy_(self._exchange(tensor)[src])

    def reduce_scatter_sum(self, tensor):
        self.log.append("reduce_scatter_sum")
        chunk = tensor.numel() // self.world_size
        parts = [p[self.rank * chunk:(self.rank + 1) * chunk] for p in self._exchange(tensor)]
        self.moved = [m + (self.world_size - 1) * chunk * tensor.element_size() for m in self.moved]
        return sum(parts[1:], parts[0].clone())

    def all_to_all(self, tensor, send_sizes, recv_sizes):
        self.log.append("all_to_all")
        sent = self._exchange(tensor)
        starts = [sum(send_sizes[:self.rank]) for _ in sent]
        pieces = [p[s:s + n] for p, s, n in zip(sent, starts, recv_sizes)]
        self.moved[0] += sum(n for r, n in enumerate(send_sizes) if r != self.rank) * tensor.element_size()
        self.moved[1] += sum(n for r, n in enumerate(recv_sizes) if r != self.rank) * tensor.element_size()
        return torch.cat(pieces)

"""Moving messages between ranks: the `Comm` interface and the collectives estimators use.

Every function here returns the same bits on every rank: all-reduce results are identical
everywhere, and gathered messages are summed in rank order by each rank itself. Each call
records its bytes, and the dense exchange it replaces, in a `ByteCounter`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from distlip.compress.accounting import (
    DOWNLINK,
    UPLINK,
    ByteCounter,
    all_gather_bytes,
    broadcast_bytes,
    ring_all_reduce_bytes,
)
from distlip.compress.compressors import Compressor, Message


class Comm(Protocol):
    """The collectives estimators need; `world_size` ranks numbered 0..world_size−1."""

    world_size: int
    rank: int

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over ranks, in place; returns it."""
        ...

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's `tensor` (same shape and dtype on all ranks), in rank order."""
        ...

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        """Overwrite `tensor` with rank `src`'s, in place; returns it."""
        ...


class SingleProcessComm:
    """One rank: every collective is the identity."""

    world_size = 1
    rank = 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor.clone()]

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        return tensor


class TorchComm:
    """`Comm` over an initialised torch.distributed process group (gloo on CPU, NCCL on GPU).

    `src` in `broadcast` is a rank within `group`.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.group)
        return out

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        dist.broadcast(tensor, group=self.group, group_src=src)
        return tensor


def mean_dense(comm: Comm, x: Tensor, counter: ByteCounter) -> Tensor:
    """Mean over ranks of the flat (d,) `x` by one all-reduce (a new tensor; `x` is untouched)."""
    out = comm.all_reduce_sum(x.clone())
    out.div_(comm.world_size)
    cost = ring_all_reduce_bytes(x.numel() * x.element_size(), comm.world_size)
    counter.add(UPLINK, sent=cost, received=cost, dense_sent=cost, dense_received=cost)
    return out


def mean_messages(comm: Comm, message: Message, d: int, counter: ByteCounter) -> Tensor:
    """Mean over ranks of the decompressed messages, as a dense (d,) tensor.

    Dense or shared-support messages: all-reduce of the values, then scatter. Otherwise
    all-gather of values and int32 indices, then scatter-add in rank order.
    """
    if message.indices is None:
        return mean_dense(comm, message.values, counter)
    world = comm.world_size
    itemsize = message.values.element_size()
    dense_cost = ring_all_reduce_bytes(d * itemsize, world)
    out = message.values.new_zeros(d)
    if message.shared:
        summed = comm.all_reduce_sum(message.values.clone()).div_(world)
        Compressor.add_into(out, Message(summed, message.indices))
        cost = ring_all_reduce_bytes(message.values.numel() * itemsize, world)
    else:
        values = comm.all_gather(message.values)
        indices = comm.all_gather(message.indices)
        # One index_add_ per rank: within a message indices are distinct, so the sum is
        # deterministic, and rank order makes it the same on every rank.
        for v, i in zip(values, indices):
            Compressor.add_into(out, Message(v, i))
        out.div_(world)
        nbytes = message.values.numel() * itemsize + message.indices.numel() * message.indices.element_size()
        cost = all_gather_bytes(nbytes, world)
    counter.add(UPLINK, sent=cost, received=cost, dense_sent=dense_cost, dense_received=dense_cost)
    return out


def broadcast_message(comm: Comm, message: Message, d: int, *, owner: int, counter: ByteCounter) -> Message:
    """Rank `owner`'s message for a tensor of d coordinates, delivered in place on every rank.

    The owner passes its message; every other rank passes receive buffers of the same
    shapes (`Compressor.empty_message`, or the tensor itself for a dense message). Shared
    indices are derived by each rank, so only the values travel.
    """
    comm.broadcast(message.values, owner)
    nbytes = message.values.numel() * message.values.element_size()
    if message.indices is not None and not message.shared:
        comm.broadcast(message.indices, owner)
        nbytes += message.indices.numel() * message.indices.element_size()
    is_owner = comm.rank == owner
    sent, received = broadcast_bytes(nbytes, comm.world_size, is_owner)
    dense_sent, dense_received = broadcast_bytes(d * message.values.element_size(), comm.world_size, is_owner)
    counter.add(DOWNLINK, sent=sent, received=received, dense_sent=dense_sent, dense_received=dense_received)
    return message

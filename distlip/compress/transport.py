"""Moving messages between ranks: the `Comm` interface and the bucketed collectives estimators use.

A step exchanges every tensor in at most two collectives, whatever the number of tensors:
small per-tensor collectives are bound by latency, not bandwidth, so compressing them would
save bytes but little time. Two ways to deliver the means:

- to every rank (`owners=None`): one ring all-reduce of the dense and shared-support values,
  one all-gather of the sparse and quantised messages packed as bytes (values, then int32
  indices; a quantiser's payload), and for quantisers on shared scales (`int4_sum`) one
  all-reduce of the block maxima (max) and one of the int8 codes (sum);
- to each tensor's owner only (`owners` given: the owner-computes path, where only the owner
  steps a tensor): one reduce-scatter whose chunk r holds the tensors rank r owns, and one
  all-to-all that sends each owner the sparse messages of its tensors. That is about half an
  all-reduce's bytes, and 1/(M−1) of an all-gather's.

Every mean is the same bits on every rank that gets it: all-reduce results are identical
everywhere, and gathered messages are summed in rank order. Each call records its bytes, and
those of the dense exchange it replaces (the same collective with every tensor sent whole),
in a `ByteCounter`.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    reduce_scatter_bytes,
    ring_all_reduce_bytes,
)
from distlip.compress.compressors import Compressor, Message
from distlip.compress.quantisers import block_absmax, blocks_of


class Comm(Protocol):
    """The collectives estimators need; `world_size` ranks numbered 0..world_size−1."""

    world_size: int
    rank: int

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over ranks, in place; returns it."""
        ...

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """Elementwise maximum of `tensor` over ranks, in place; returns it."""
        ...

    def reduce_scatter_sum(self, tensor: Tensor) -> Tensor:
        """Chunk `rank` (of world_size equal chunks of the flat `tensor`) summed over ranks (a new tensor)."""
        ...

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's `tensor` (same shape and dtype on all ranks), in rank order."""
        ...

    def all_to_all(self, tensor: Tensor, send_sizes: list[int], recv_sizes: list[int]) -> Tensor:
        """Send the consecutive pieces of the flat `tensor` (sizes `send_sizes`) to ranks 0, 1, …;
        returns what each rank sent here, concatenated in rank order (sizes `recv_sizes`)."""
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

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        return tensor

    def reduce_scatter_sum(self, tensor: Tensor) -> Tensor:
        return tensor.clone()

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor.clone()]

    def all_to_all(self, tensor: Tensor, send_sizes: list[int], recv_sizes: list[int]) -> Tensor:
        return tensor.clone()

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

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def reduce_scatter_sum(self, tensor: Tensor) -> Tensor:
        out = tensor.new_empty(tensor.numel() // self.world_size)
        # Newer torch renames reduce_scatter_tensor (same arguments) and warns on the old name.
        reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
        reduce_scatter(out, tensor, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.group)
        return out

    def all_to_all(self, tensor: Tensor, send_sizes: list[int], recv_sizes: list[int]) -> Tensor:
        out = tensor.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, tensor, recv_sizes, send_sizes, group=self.group)
        return out

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        dist.broadcast(tensor, group=self.group, group_src=src)
        return tensor


# ---- packing sparse messages as bytes -------------------------------------------------------

def _align(offset: int, itemsize: int) -> int:
    return -(-offset // itemsize) * itemsize


def _layout(messages: Sequence[Message], *, with_indices: bool) -> tuple[list[tuple[int, int]], int]:
    """Byte offsets (values, indices) of each message in a packed buffer, and its length.

    Each piece starts at a multiple of its item size, so it can be viewed in place; fp32
    values with int32 indices need no padding. Indices are left out when `with_indices` is
    False or the message's are shared.
    """
    offsets, end = [], 0
    for m in messages:
        start = _align(end, m.values.element_size())
        end = start + m.values.nbytes
        idx = -1
        if with_indices and m.indices is not None and not m.shared:
            idx = _align(end, m.indices.element_size())
            end = idx + m.indices.nbytes
        offsets.append((start, idx))
    return offsets, end


def _pack(messages: Sequence[Message], device: torch.device, *, with_indices: bool) -> Tensor:
    """The messages as one uint8 buffer on `device` (empty when there are none)."""
    offsets, total = _layout(messages, with_indices=with_indices)
    buf = torch.zeros(total, dtype=torch.uint8, device=device)
    for m, (v, i) in zip(messages, offsets):
        buf[v:v + m.values.nbytes].copy_(m.values.reshape(-1).view(torch.uint8))
        if i >= 0:
            buf[i:i + m.indices.nbytes].copy_(m.indices.view(torch.uint8))
    return buf


def _unpack(buf: Tensor, like: Sequence[Message], *, with_indices: bool) -> list[Message]:
    """Views into `buf` (packed by `_pack` from messages shaped like `like`) as messages."""
    offsets, _ = _layout(like, with_indices=with_indices)
    out = []
    for m, (v, i) in zip(like, offsets):
        values = buf[v:v + m.values.nbytes].view(m.values.dtype)
        indices = buf[i:i + m.indices.nbytes].view(m.indices.dtype) if i >= 0 else m.indices
        out.append(Message(values, indices, m.shared, m.codec, m.dtype))
    return out


# ---- the uplink: means of many messages -----------------------------------------------------

def _summable(message: Message) -> bool:
    """Dense or shared-support: the values of all ranks add position by position (quantised
    values do not: each rank has its own scales)."""
    return message.codec is None and (message.indices is None or message.shared)


def _shared_scales(message: Message) -> bool:
    """Quantised on scales the ranks agree on in the exchange: the codes add up."""
    return message.codec is not None and message.shared


def _expand(message: Message, values: Tensor, d: int) -> Tensor:
    """The dense (d,) tensor for summed `values` on the support of `message`."""
    if message.indices is None:
        return values
    return Compressor.add_into(values.new_zeros(d), Message(values, message.indices))


def mean_many(comm: Comm, messages: Sequence[Message], sizes: Sequence[int], counter: ByteCounter,
              owners: Sequence[int] | None = None) -> list[Tensor | None]:
    """Mean over ranks of each rank's decompressed messages: dense (d,) tensors, in order.

    messages[i] is this rank's message for tensor i of sizes[i] coordinates (every rank passes
    messages of the same shapes). With `owners`, mean i is computed on rank owners[i] only and
    is None elsewhere; without, every rank gets every mean. On more than 2 ranks the owner may
    sum in another order than an all-reduce would (the last bit can differ).
    """
    sums: list[Tensor | None] = [None] * len(messages)
    summable = [i for i, m in enumerate(messages) if _summable(m)]
    quantised = [i for i, m in enumerate(messages) if _shared_scales(m)]
    sparse = [i for i, m in enumerate(messages) if not _summable(m) and not _shared_scales(m)]
    sent = received = 0.0
    if quantised:
        cost = _sum_quantised(comm, messages, sizes, quantised, owners, sums)
        sent, received = sent + cost, received + cost
    for dtype in dict.fromkeys(messages[i].values.dtype for i in summable):  # one bucket per dtype, in order
        ids = [i for i in summable if messages[i].values.dtype == dtype]
        cost = _sum_values(comm, messages, sizes, ids, owners, sums)
        sent, received = sent + cost, received + cost
    if sparse:
        cost_sent, cost_received = _sum_sparse(comm, messages, sizes, sparse, owners, sums)
        sent, received = sent + cost_sent, received + cost_received
    world = comm.world_size
    dense = _dense_cost([d * m.itemsize for d, m in zip(sizes, messages)], owners, world)
    counter.add(UPLINK, sent=sent, received=received, dense_sent=dense, dense_received=dense)
    return [None if total is None else total.div_(world) for total in sums]


def _sum_values(comm: Comm, messages: Sequence[Message], sizes: Sequence[int], ids: list[int],
                owners: Sequence[int] | None, sums: list[Tensor | None]) -> float:
    """Sum over ranks of dense or shared-support messages `ids` (one dtype), as dense (d,) tensors
    into sums[i] where this rank gets them. One reduce-scatter whose chunk r holds rank r's
    tensors, padded to the largest; when that padding would cost more than an all-reduce of
    everything (a lone dense tensor, as in MARINA's rounds, on more than 2 ranks), or without
    owners, one all-reduce. Returns the bytes this rank sent (= received)."""
    world, itemsize = comm.world_size, messages[ids[0]].values.element_size()
    numel = {i: messages[i].values.numel() for i in ids}
    by_owner = [[i for i in ids if owners[i] == r] for r in range(world)] if owners is not None else []
    chunk = max((sum(numel[i] for i in group) for group in by_owner), default=0)
    all_reduce_cost = ring_all_reduce_bytes(sum(numel.values()) * itemsize, world)
    if owners is None or all_reduce_cost < reduce_scatter_bytes(chunk * itemsize, world):
        flat = torch.cat([messages[i].values for i in ids])
        summed = comm.all_reduce_sum(flat).split([numel[i] for i in ids])
        if owners is not None:
            summed = [values for i, values in zip(ids, summed) if owners[i] == comm.rank]
            ids = by_owner[comm.rank]
        cost = all_reduce_cost
    else:
        flat = messages[ids[0]].values.new_empty(world * chunk)
        for r, group in enumerate(by_owner):
            start = r * chunk
            for i in group:  # straight into place: one copy of each message
                flat[start:start + numel[i]].copy_(messages[i].values)
                start += numel[i]
            flat[start:(r + 1) * chunk].zero_()  # the padding
        ids = by_owner[comm.rank]
        summed = comm.reduce_scatter_sum(flat)[:sum(numel[i] for i in ids)].split([numel[i] for i in ids])
        cost = reduce_scatter_bytes(chunk * itemsize, world)
    for i, values in zip(ids, summed):
        sums[i] = _expand(messages[i], values, sizes[i])
    return cost


def _sum_quantised(comm: Comm, messages: Sequence[Message], sizes: Sequence[int], ids: list[int],
                   owners: Sequence[int] | None, sums: list[Tensor | None]) -> float:
    """Sum over ranks of the messages `ids` quantised on shared scales (`quantisers.SumQuantiser`),
    as dense (d,) tensors into sums[i] where this rank gets them: one all-reduce (max) of every
    block's largest magnitude (fp32), then each rank's int8 codes on those scales, summed by one
    int8 all-reduce (with owners too: an int8 all-reduce costs less than gathering). Each message
    becomes this rank's own payload (shared scales, its codes), for error feedback to subtract.
    Returns the bytes this rank sent (= received)."""
    world, codec = comm.world_size, messages[ids[0]].codec
    if codec.world_size != world:  # its levels keep M codes' sum within int8 only for its M
        raise ValueError(f"{codec!r} quantises for {codec.world_size} ranks, but the exchange has {world}")
    absmax = comm.all_reduce_max(torch.cat([block_absmax(messages[i].values) for i in ids]))
    maxima = absmax.split([blocks_of(sizes[i]) for i in ids])
    codes = []
    for i, top in zip(ids, maxima):
        messages[i].values = codec.encode(messages[i].values, top)
        codes.append(messages[i].values[top.nbytes:])  # the payload: scales, then the codes
    summed = comm.all_reduce_sum(torch.cat(codes).view(torch.int8)).split([sizes[i] for i in ids])
    for i, top, total in zip(ids, maxima, summed):
        if owners is None or owners[i] == comm.rank:
            sums[i] = codec.decode_sum(top, total, messages[i].tensor_dtype)
    return ring_all_reduce_bytes(absmax.nbytes, world) + ring_all_reduce_bytes(sum(c.numel() for c in codes), world)


def _sum_sparse(comm: Comm, messages: Sequence[Message], sizes: Sequence[int], ids: list[int],
                owners: Sequence[int] | None, sums: list[Tensor | None]) -> tuple[float, float]:
    """Sum over ranks of the sparse messages `ids`, as dense (d,) tensors into sums[i] where this
    rank gets them: every rank's packed (values, indices) by one all-gather, or each owner's by
    one all-to-all; scatter-added in rank order. Returns the bytes this rank (sent, received)."""
    world, rank, device = comm.world_size, comm.rank, messages[ids[0]].values.device
    if owners is None:
        parts = comm.all_gather(_pack([messages[i] for i in ids], device, with_indices=True))
        sent = received = all_gather_bytes(parts[0].nbytes, world)
    else:
        pieces = [_pack([messages[i] for i in ids if owners[i] == r], device, with_indices=True)
                  for r in range(world)]
        counts = [p.numel() for p in pieces]
        parts = list(comm.all_to_all(torch.cat(pieces), counts, [counts[rank]] * world).split(counts[rank]))
        sent = float(sum(n for r, n in enumerate(counts) if r != rank))
        received = float((world - 1) * counts[rank])
        ids = [i for i in ids if owners[i] == rank]
    like = [messages[i] for i in ids]
    totals = [torch.zeros(sizes[i], dtype=m.tensor_dtype, device=device) for i, m in zip(ids, like)]
    for part in parts:  # rank order: the same sums on every rank
        for total, m in zip(totals, _unpack(part, like, with_indices=True)):
            Compressor.add_into(total, m)
    for i, total in zip(ids, totals):
        sums[i] = total
    return sent, received


def _dense_cost(nbytes: Sequence[int], owners: Sequence[int] | None, world: int) -> float:
    """Bytes per rank of the same exchange with every tensor sent whole (by the cheaper of the two
    collectives `_sum_values` chooses from, when there are owners)."""
    all_reduce = ring_all_reduce_bytes(sum(nbytes), world)
    if owners is None:
        return all_reduce
    chunk = max(sum(b for b, o in zip(nbytes, owners) if o == r) for r in range(world))
    return min(all_reduce, reduce_scatter_bytes(chunk, world))


# ---- the downlink: one owner's messages to everyone ------------------------------------------

def broadcast_messages(comm: Comm, messages: Sequence[Message], sizes: Sequence[int], *, owner: int,
                       counter: ByteCounter) -> None:
    """Rank `owner`'s messages, delivered in place into every other rank's buffers, in one broadcast.

    The owner passes its messages; every other rank passes receive buffers of the same
    shapes (`Compressor.empty_message`, or the tensor itself for a dense message). Shared
    indices are derived by each rank, so only the values (and unshared indices) travel.
    """
    is_owner, device = comm.rank == owner, messages[0].values.device
    if is_owner:
        buf = comm.broadcast(_pack(messages, device, with_indices=True), owner)
    else:
        size = _layout(messages, with_indices=True)[1]
        buf = comm.broadcast(torch.empty(size, dtype=torch.uint8, device=device), owner)
        for m, got in zip(messages, _unpack(buf, messages, with_indices=True)):
            m.values.copy_(got.values.view_as(m.values))
            if got.indices is not m.indices:
                m.indices.copy_(got.indices)
    sent, received = broadcast_bytes(buf.nbytes, comm.world_size, is_owner)
    dense = sum(d * m.values.element_size() for d, m in zip(sizes, messages))
    dense_sent, dense_received = broadcast_bytes(dense, comm.world_size, is_owner)
    counter.add(DOWNLINK, sent=sent, received=received, dense_sent=dense_sent, dense_received=dense_received)

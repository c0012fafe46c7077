"""Compressed communication over a real 2-process gloo group (one launch for every check), the
quantiser whose int8 codes are summed by the all-reduce (int4_sum) included, and the start-up
check that replicas agree (`distributed.replicas`), which shares the launch.

Each rank runs `_worker`, which records what it computed; the tests compare the ranks'
records in the parent process.
"""

from __future__ import annotations

import math
import os
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distlip.compress import (
    EF14,
    Dense,
    Diana,
    Downlink,
    EF21Momentum,
    Identity,
    Marina,
    Plain,
    RandK,
    SumQuantiser,
    TopK,
    TorchComm,
)
from distlip.compress.accounting import all_gather_bytes, broadcast_bytes, reduce_scatter_bytes, ring_all_reduce_bytes
from distlip.compress.quantisers import block_absmax, blocks_of
from distlip.distributed.replicas import agree_or_broadcast

from helpers.compression import aggregate, sync

WORLD = 2
D, STEPS, WARMUP = 400, 6, 2

PAIRS = {
    "plain/randk-own": (Plain, lambda r: RandK(r, shared_seed=False, seed=1)),
    "diana/randk": (Diana, lambda r: RandK(r, seed=1)),
    "diana/randk-own": (Diana, lambda r: RandK(r, shared_seed=False, seed=1)),
    "marina/randk": (partial(Marina, same_batch=False), lambda r: RandK(r, seed=1)),  # one gradient per step
    "ef21/topk": (EF21Momentum, TopK),
    "ef21/randk-unscaled": (EF21Momentum, lambda r: RandK(r, scaled=False, seed=1)),
    "ef14/topk": (EF14, TopK),
    "ef14/randk-unscaled-own": (EF14, lambda r: RandK(r, scaled=False, shared_seed=False, seed=1)),
}
RATIO_ONE = {
    **PAIRS,
    "dense/identity": (Dense, lambda r: Identity()),
    "plain/topk": (Plain, TopK),
    "diana/identity": (Diana, lambda r: Identity()),
}


class RecordingComm:
    """A `Comm` that also totals, per rank, the bytes its collectives actually moved."""

    def __init__(self, comm: TorchComm) -> None:
        self.comm = comm
        self.world_size, self.rank = comm.world_size, comm.rank
        self.sent = self.received = 0.0

    def all_reduce_sum(self, tensor):
        cost = ring_all_reduce_bytes(tensor.nbytes, self.world_size)
        self.sent += cost
        self.received += cost
        return self.comm.all_reduce_sum(tensor)

    def all_reduce_max(self, tensor):
        cost = ring_all_reduce_bytes(tensor.nbytes, self.world_size)
        self.sent += cost
        self.received += cost
        return self.comm.all_reduce_max(tensor)

    def all_gather(self, tensor):
        cost = all_gather_bytes(tensor.nbytes, self.world_size)
        self.sent += cost
        self.received += cost
        return self.comm.all_gather(tensor)

    def reduce_scatter_sum(self, tensor):
        cost = reduce_scatter_bytes(tensor.nbytes // self.world_size, self.world_size)
        self.sent += cost
        self.received += cost
        return self.comm.reduce_scatter_sum(tensor)

    def all_to_all(self, tensor, send_sizes, recv_sizes):
        others = [r for r in range(self.world_size) if r != self.rank]
        self.sent += sum(send_sizes[r] for r in others) * tensor.element_size()
        self.received += sum(recv_sizes[r] for r in others) * tensor.element_size()
        return self.comm.all_to_all(tensor, send_sizes, recv_sizes)

    def broadcast(self, tensor, src):
        sent, received = broadcast_bytes(tensor.nbytes, self.world_size, self.rank == src)
        self.sent += sent
        self.received += received
        return self.comm.broadcast(tensor, src)


def _grads(rank: int) -> torch.Tensor:
    return torch.randn(STEPS, 2, D, generator=torch.Generator().manual_seed(100 + rank))


def _run(cls, compressor, comm):
    """Aggregates of two tensors over STEPS steps, with the warm-up in front."""
    est = cls(compressor, comm, warmup_steps=WARMUP)
    grads = _grads(comm.rank)
    outs = [aggregate(est, f"p{i}", grads[s, i], step=s) for s in range(STEPS) for i in range(2)]
    return outs, est


def _run_owned(cls, compressor, comm):
    """The same, in one reduce-scatter / all-to-all per step: tensor p{i} is owned by rank i, which
    compresses its own share too (exact_own=False), so the aggregates must equal `_run`'s."""
    est = cls(compressor, comm, warmup_steps=WARMUP, exact_own=False)
    grads = _grads(comm.rank)
    owners = {"p0": 0, "p1": 1}
    outs = [est.aggregate_many({"p0": grads[s, 0], "p1": grads[s, 1]}, step=s, owners=owners) for s in range(STEPS)]
    return outs, est


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    comm = TorchComm()
    record: dict = {}

    record["masks"] = {
        "shared": RandK(0.05, seed=3).mask(D, step=4, tensor_id="w", rank=rank),
        "own": RandK(0.05, shared_seed=False, seed=3).mask(D, step=4, tensor_id="w", rank=rank),
    }

    # Per pair, the per-tensor exchange to everyone ("all") and the bucketed one to the owners ("owned").
    record["all"], record["owned"] = {}, {}
    for key, (cls, make) in PAIRS.items():
        for kind, run in (("all", _run), ("owned", _run_owned)):
            recording = RecordingComm(comm)
            outs, est = run(cls, make(0.05), recording)
            counted = (est.counter.uplink.sent, est.counter.uplink.received)
            record[kind][key] = {"outs": outs, "bytes": (*counted, recording.sent, recording.received)}

    record["dense"] = _run(Dense, Identity(), comm)[0]
    record["ratio_one"] = {key: _run(cls, make(1.0), comm)[0] for key, (cls, make) in RATIO_ONE.items()}

    record["downlink"] = {}
    downlinks = {"topk": TopK(0.05), "randk-unscaled": RandK(0.05, scaled=False), "ratio-one": TopK(1.0)}
    for key, compressor in downlinks.items():
        recording = RecordingComm(comm)
        down = Downlink(compressor, recording, warmup_steps=1)
        steps = torch.randn(STEPS, 2, D, generator=torch.Generator().manual_seed(7))
        weights = [torch.zeros(D), torch.zeros(D)]
        masters = [torch.zeros(D), torch.zeros(D)]
        for s in range(STEPS):
            for i, owner in enumerate((0, 1)):  # tensor i is owned by rank i
                masters[i] -= 0.1 * steps[s, i]
                sync(down, f"p{i}", weights[i], masters[i] if rank == owner else None, step=s, owner=owner)
        record["downlink"][key] = {
            "weights": weights,
            "masters": masters,
            "bytes": (down.counter.downlink.sent, down.counter.downlink.received, recording.sent, recording.received),
        }

    record["int4_sum"] = _int4_sum(comm)
    # What int4_sum relies on: gloo sums int8 exactly up to ±127.
    edge = torch.tensor([100, -64, 7] if rank == 0 else [27, -63, -7], dtype=torch.int8)
    dist.all_reduce(edge)
    record["int8_sum"] = edge.tolist()

    record["replicas"] = _replicas(rank)

    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _replicas(rank: int) -> dict:
    """agree_or_broadcast on equal weights, then with one element of rank 1's one ulp off."""
    same = [torch.randn(300, 200, generator=torch.Generator().manual_seed(5)), torch.arange(7.0)]
    equal_sent = agree_or_broadcast(same)
    differ = [t.clone() for t in same]
    if rank == 1:
        differ[0][299, 199] = torch.nextafter(differ[0][299, 199], torch.tensor(math.inf))
    return {"equal": (equal_sent, same), "differ": (agree_or_broadcast(differ), differ)}


def _int4_sum(comm: TorchComm) -> dict:
    """EF14 + int4_sum over gloo (codes summed in int8), and the reference every rank computes from
    all ranks' p = g + e gathered whole: each rank's codes on the shared block maxima, decoded, averaged."""
    recording = RecordingComm(comm)
    est = EF14(SumQuantiser(WORLD), recording)
    grads = _grads(comm.rank)
    means, references = [], []
    for s in range(STEPS):
        names = ("p0", "p1")
        p = {n: grads[s, i] + est.state_dict().get(n, {}).get("e", torch.zeros(D)) for i, n in enumerate(names)}
        means.append(est.aggregate_many({n: grads[s, i] for i, n in enumerate(names)}, step=s))
        reference = {}
        for n in names:
            every = comm.all_gather(p[n].clone())
            top = torch.stack([block_absmax(x) for x in every]).amax(0)
            codec = est.compressor
            reference[n] = sum(codec.dequantise(codec.encode(x, top), D, torch.float32) for x in every) / WORLD
        references.append(reference)
    return {"means": means, "references": references,
            "bytes": (est.counter.uplink.sent, est.counter.uplink.received, recording.sent, recording.received)}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress_dist")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def test_shared_seed_masks_agree_across_ranks(records):
    r0, r1 = (r["masks"] for r in records)
    assert torch.equal(r0["shared"], r1["shared"])
    assert not torch.equal(r0["own"], r1["own"])


@pytest.mark.parametrize("key", PAIRS)
def test_aggregate_is_bit_identical_on_both_ranks(records, key):
    r0, r1 = (r["all"][key]["outs"] for r in records)
    assert _same(r0, r1)
    # The compressed steps really differ from the dense mean (the check is not vacuous).
    assert not _same(r0[2 * WARMUP:], records[0]["dense"][2 * WARMUP:])


@pytest.mark.parametrize("key", RATIO_ONE)
def test_ratio_one_equals_dense_all_reduce(records, key):
    for record in records:
        assert _same(record["ratio_one"][key], record["dense"])


@pytest.mark.parametrize("key", PAIRS)
def test_byte_counter_matches_tensors_sent(records, key):
    for record in records:
        counted_sent, counted_received, sent, received = record["all"][key]["bytes"]
        assert (counted_sent, counted_received) == (sent, received)


@pytest.mark.parametrize("key", PAIRS)
def test_owner_only_exchange_gives_each_owner_the_all_reduce_bits(records, key):
    """Reduce-scatter and all-to-all over gloo: rank i gets exactly the aggregate of p{i} that
    the all-reduce / all-gather path gives, nothing else, and counts the bytes it moved."""
    for rank, record in enumerate(records):
        owned = record["owned"][key]
        assert all(set(step) == {f"p{rank}"} for step in owned["outs"])
        assert _same([step[f"p{rank}"] for step in owned["outs"]], record["all"][key]["outs"][rank::2])
        counted_sent, counted_received, sent, received = owned["bytes"]
        assert (counted_sent, counted_received) == (sent, received)
        assert counted_sent < record["all"][key]["bytes"][0]  # fewer bytes than the all-reduce path


def test_byte_counter_against_message_sizes(records):
    """Shared-mask Rand-k all-reduces k values; Top-k all-gathers k values and k int32 indices."""
    k, dense = 20, ring_all_reduce_bytes(D * 4, WORLD)
    warm = 2 * WARMUP * dense  # two tensors
    compressed = 2 * (STEPS - WARMUP)
    assert records[0]["all"]["diana/randk"]["bytes"][0] == warm + compressed * ring_all_reduce_bytes(k * 4, WORLD)
    assert records[0]["all"]["ef21/topk"]["bytes"][0] == warm + compressed * all_gather_bytes(k * 8, WORLD)


def test_int4_sum_codes_summed_over_gloo_equal_the_gathered_codes_mean(records):
    """Every step compressed (EF14 from a zero residual): the int8 all-reduce of codes on shared
    scales gives the mean of each rank's decoded codes (gathered as a reference), the same bits on
    both ranks, in two all-reduces per step (fp32 block maxima, int8 codes), counted as sent."""
    assert records[0]["int8_sum"] == records[1]["int8_sum"] == [127, -127, 0]
    r0, r1 = (r["int4_sum"] for r in records)
    for step, (mean, reference) in enumerate(zip(r0["means"], r0["references"])):
        for n in mean:
            assert torch.equal(_bits(mean[n]), _bits(r1["means"][step][n]))
            torch.testing.assert_close(mean[n], reference[n], rtol=0, atol=1e-6)
            assert not torch.equal(mean[n], records[0]["dense"][2 * step + int(n[1])])  # quantised, not dense
    per_step = ring_all_reduce_bytes(2 * 4 * blocks_of(D), WORLD) + ring_all_reduce_bytes(2 * D, WORLD)
    for record in records:
        counted_sent, counted_received, sent, received = record["int4_sum"]["bytes"]
        assert counted_sent == counted_received == sent == received == STEPS * per_step


@pytest.mark.parametrize("key", ["topk", "randk-unscaled", "ratio-one"])
def test_downlink_working_copies_identical(records, key):
    r0, r1 = (r["downlink"][key] for r in records)
    assert _same(r0["weights"], r1["weights"])
    for record in records:
        counted_sent, counted_received, sent, received = record["downlink"][key]["bytes"]
        assert (counted_sent, counted_received) == (sent, received)
    # The owner's master is the truth; with ratio 1.0 the copies equal it exactly.
    owned = [records[i]["downlink"][key]["masters"][i] for i in range(WORLD)]
    if key == "ratio-one":
        assert _same(r0["weights"], owned)
    else:
        assert not _same(r0["weights"], owned)


def _three_rank_worker(rank: int, store: str, out_dir: str) -> None:
    """Owner-only and to-everyone exchanges of three tensors, none owned by rank 2."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3)
    comm, owners = TorchComm(), {"a": 0, "b": 1, "c": 0}
    record = {}
    for key, (cls, compressor) in {"ef21/topk": (EF21Momentum, TopK(0.1)), "diana/randk": (Diana, RandK(0.1))}.items():
        everyone, owned = cls(compressor, comm, warmup_steps=1), cls(compressor, comm, warmup_steps=1, exact_own=False)
        record[key] = []
        for step in range(4):
            gen = torch.Generator().manual_seed(10 * step + rank)
            grads = {n: torch.randn(D, generator=gen) for n in owners}
            record[key].append((everyone.aggregate_many(grads, step=step),
                                owned.aggregate_many(grads, step=step, owners=owners)))
    torch.save(record, os.path.join(out_dir, f"three{rank}.pt"))
    dist.destroy_process_group()


def test_owner_only_exchange_on_three_ranks_one_owning_nothing(tmp_path):
    """Gloo's reduce-scatter and all-to-all with an empty share: each owner gets its tensors' means
    (equal to the all-reduce path's up to summation order), and rank 2 gets nothing."""
    mp.spawn(_three_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=3, join=True)
    owners = {"a": 0, "b": 1, "c": 0}
    for rank in range(3):
        for key, steps in torch.load(tmp_path / f"three{rank}.pt").items():
            for everyone, owned in steps:
                assert set(owned) == {n for n, o in owners.items() if o == rank}, key
                for n, mean in owned.items():
                    torch.testing.assert_close(mean, everyone[n], rtol=1e-6, atol=1e-6)


def test_replicas_that_agree_send_no_weights_and_ones_that_differ_get_rank_zeros(records):
    r0, r1 = records[0]["replicas"], records[1]["replicas"]
    assert r0["equal"][0] is False and r1["equal"][0] is False
    assert _same(r0["equal"][1], r1["equal"][1])
    assert r0["differ"][0] is True and r1["differ"][0] is True
    assert _same(r1["differ"][1], r0["equal"][1])


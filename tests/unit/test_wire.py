"""The per-rank byte model of every torch.distributed collective (distlip.distributed.wire), without a
process group: the group's size, this rank and the backend are patched in. The model against real
traffic is tests/multiproc/test_wire_bytes.py."""

import pytest
import torch
import torch.distributed as dist

from distlip.compress.accounting import ring_all_reduce_bytes
from distlip.distributed.wire import WireCounter, payload

M, N = 4, 4096  # ranks; bytes of the tensor below
T = torch.zeros(N // 4)


@pytest.fixture
def group(monkeypatch):
    """A 4-rank gloo group in which this process is rank 1."""
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: M)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")


def test_all_reduce_and_all_gather_are_ring_sized(group):
    assert payload("all_reduce", (T,), {}) == (ring_all_reduce_bytes(N, M),) * 2
    assert payload("all_gather", ([T] * M, T), {}) == ((M - 1) * N,) * 2
    assert payload("all_gather_into_tensor", (), {"output_tensor": torch.zeros(M * N // 4), "input_tensor": T}) \
        == ((M - 1) * N,) * 2


def test_rooted_collectives_depend_on_the_root(group):
    share = (M - 1) / M * N
    assert payload("reduce", (T, 0), {}) == (share + N / M, share)  # a leaf: its chunk to the root too
    assert payload("reduce", (T, 1), {}) == (share, 2 * share)  # the root gathers the others' chunks
    assert payload("broadcast", (T,), {"src": 1}) == (N, 0)
    assert payload("broadcast", (T, 0), {}) == ((M - 2) / (M - 1) * N, N)
    assert payload("broadcast", (T,), {"group_src": 1}) == (N, 0)  # a rank within the group, as TorchComm passes
    # over the ranks, a broadcast sends what it receives: (M − 1)·N
    assert N + (M - 1) * (M - 2) / (M - 1) * N == pytest.approx((M - 1) * N)


def test_reduce_scatter_is_an_all_reduce_on_gloo_and_a_ring_on_nccl(group, monkeypatch):
    out, inp = torch.zeros(N // 4 // M), T
    assert payload("reduce_scatter_tensor", (out, inp), {}) == (ring_all_reduce_bytes(N, M),) * 2
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert payload("reduce_scatter_tensor", (out, inp), {}) == ((M - 1) / M * N,) * 2


def test_all_to_all_counts_the_other_ranks_pieces(group):
    out, inp = torch.zeros(10), torch.zeros(16)
    sent, received = payload("all_to_all_single", (out, inp, [1, 2, 3, 4], [1, 5, 5, 5]), {})
    assert (sent, received) == ((1 + 5 + 5) * 4, (1 + 3 + 4) * 4)  # rank 1 keeps piece 1 of each


def test_one_rank_moves_nothing(monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    assert payload("all_reduce", (T,), {}) == (0.0, 0.0)


def test_a_nested_call_is_counted_once_under_the_current_category(group):
    counter = WireCounter()
    inner = counter._wrap("all_reduce", lambda tensor: tensor)
    outer = counter._wrap("broadcast", lambda tensor, src: inner(tensor))  # as an object collective calls a tensor one
    outer(T, 1)
    with counter.category("eval"):
        inner(T)
    assert counter.calls == {"train": 1, "eval": 1}
    assert counter.sent["train"] == N and counter.received["train"] == 0
    fields = counter.log_fields()
    assert fields["wire_eval_bytes_total"] == ring_all_reduce_bytes(N, M)
    assert fields["wire_sent_total"] == N + ring_all_reduce_bytes(N, M)
    assert fields["wire_bytes_total"] == max(fields["wire_sent_total"], fields["wire_received_total"])


def test_install_wraps_and_uninstall_restores():
    original = dist.all_reduce
    first, second = WireCounter().install(), WireCounter().install()  # the second replaces the first
    try:
        assert dist.all_reduce is not original and dist.distributed_c10d.all_reduce is dist.all_reduce
        assert dist.all_reduce.__wrapped__ is original  # not a wrapper of the first counter's wrapper
    finally:
        second.uninstall()
        first.uninstall()
    assert dist.all_reduce is original

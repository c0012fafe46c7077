"""The roll call that names a lost rank, on an in-memory store (no process group, no launch)."""

import threading

import pytest
import torch.distributed as dist

from distlip.distributed import liveness


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setenv("GROUP_RANK", "0")
    return dist.HashStore()


def announce_all(store, nodes_of_ranks: list[int], monkeypatch) -> None:
    for rank, node in enumerate(nodes_of_ranks):
        monkeypatch.setenv("GROUP_RANK", str(node))
        liveness.announce(store, rank, timeout_s=20)


def test_the_silent_rank_is_named_by_the_lowest_survivor_only(store, monkeypatch):
    announce_all(store, [0, 0, 1, 1], monkeypatch)
    failure = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 20000ms for send operation")
    messages = {}
    # Ranks 1 and 3 answer the roll call with rank 0; rank 2 is dead.
    def answer(r: int) -> None:
        messages[r] = liveness.lost_peer_message(store, r, 4, failure, wait_s=1)

    threads = [threading.Thread(target=answer, args=(r,)) for r in (1, 3)]
    for t in threads:
        t.start()
    messages[0] = liveness.lost_peer_message(store, 0, 4, failure, wait_s=1)
    for t in threads:
        t.join()
    assert messages[1] is None and messages[3] is None
    host = __import__("socket").gethostname()
    assert messages[0] == (
        f"rank 2 (node 1, host {host}) stopped answering: no reply within dist.timeout=20 s, or a broken connection "
        "([gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 20000ms for send operation); its process "
        f"died, hangs or lost its network; {liveness.FIX}"
    )


def test_several_lost_ranks_and_an_unannounced_one(store, monkeypatch):
    announce_all(store, [0, 1], monkeypatch)  # ranks 2 and 3 never announced
    missing = liveness.roll_call(store, 0, 4, wait_s=0.5)
    assert missing == [1, 2, 3]
    assert liveness.where(store, missing).startswith("rank 1 (node 1, host ")
    assert liveness.where(store, missing).endswith("), rank 2, rank 3")


@pytest.mark.parametrize(
    "exc, peer",
    [
        (dist.DistBackendError("boom"), True),
        (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                      "Connection closed by peer [10.0.0.2]:1234"), True),
        (RuntimeError("Timed out waiting 300000ms for recv operation to complete"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("gloo"), False),
    ],
)
def test_peer_failures_are_told_from_own_mistakes(exc, peer):
    assert liveness.is_peer_failure(exc) is peer

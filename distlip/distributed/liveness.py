"""Who stopped answering: naming the rank (and its node and host) behind a failed collective.

Every collective waits at most `dist.timeout` seconds (the process group's timeout). When one
fails, by timeout or because a peer's connection broke, the surviving ranks hold a roll call in
the launcher's key-value store: each writes its name and waits a few seconds for the others.
Ranks that do not answer are the ones that died, hang (a stopped process still holds its
sockets, so only the timeout reveals it) or lost their network. If the store itself is gone, the
node that hosts it (node 0, the rendezvous host) is the one lost.

Each rank records its node and host in the store at start-up (`announce`), so that the survivor
can say where the lost rank ran even after its host is gone. The functions take the store, rank
and world size as arguments (`distributed.env` passes the process group's), so they run on any
`torch.distributed.Store`, e.g. a `HashStore` in a test.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from datetime import timedelta

import torch.distributed as dist

_HOST_KEY = "distlip/host/{}"
_ALIVE_KEY = "distlip/alive/{}"
# Seconds the survivors wait for one another at the roll call: they notice a failure at about the
# same time (the same timeout, or a broken connection passed on within the collective).
ROLL_CALL_S = 10.0
FIX = ("this job cannot continue: relaunch every node with --resume auto (train.resume=auto) to continue from "
       "the newest complete checkpoint")


def announce(store: dist.Store, rank: int, timeout_s: float) -> None:
    """Record this rank's node (torchrun's GROUP_RANK) and host, and the group's timeout."""
    info = {"node": os.environ.get("GROUP_RANK", "?"), "host": socket.gethostname(), "timeout_s": timeout_s}
    store.set(_HOST_KEY.format(rank), json.dumps(info))


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed on another rank's account (timeout, broken
    connection) rather than this rank's own mistake."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset", "Timed out")
    )


def roll_call(store: dist.Store, rank: int, world_size: int, wait_s: float = ROLL_CALL_S) -> list[int]:
    """Among the survivors: the ranks that did not answer within `wait_s` seconds.

    Raises (`torch.distributed.DistError`, OSError, RuntimeError) when the store does not answer.
    """
    store.set_timeout(timedelta(seconds=max(wait_s, 1.0)))
    store.set(_ALIVE_KEY.format(rank), "1")
    deadline = time.monotonic() + wait_s
    while True:
        missing = [r for r in range(world_size) if not store.check([_ALIVE_KEY.format(r)])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def where(store: dist.Store, ranks: Iterable[int]) -> str:
    """`rank 1 (node 1, host gpu08)` for each of `ranks`, from what they announced."""
    parts = []
    for r in ranks:
        try:
            info = json.loads(store.get(_HOST_KEY.format(r)))
            parts.append(f"rank {r} (node {info['node']}, host {info['host']})")
        except Exception:  # the store may not know it: name the rank alone
            parts.append(f"rank {r}")
    return ", ".join(parts)


def lost_peer_message(
    store: dist.Store, rank: int, world_size: int, exc: BaseException, wait_s: float = ROLL_CALL_S
) -> str | None:
    """One line naming who stopped answering and what to do, for the lowest-numbered survivor
    to print (None on the other survivors). Holds the roll call: at most `wait_s` seconds."""
    try:
        missing = roll_call(store, rank, world_size, wait_s)
        who = where(store, missing)
        timeout_s = json.loads(store.get(_HOST_KEY.format(rank)))["timeout_s"]
    except Exception:
        addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return (f"the rendezvous store at {addr} (node 0) stopped answering after a collective failed: node 0's "
                f"process or host died, hangs or lost its network; {FIX}")
    if rank != min(set(range(world_size)) - set(missing)):
        return None
    if not missing:
        return f"a collective failed although every rank answers ({_first_line(exc)}); {FIX}"
    return (f"{who} stopped answering: no reply within dist.timeout={timeout_s:g} s, or a broken connection "
            f"({_first_line(exc)}); its process died, hangs or lost its network; {FIX}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]

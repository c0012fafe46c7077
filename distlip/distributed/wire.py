"""Every byte a rank moves through torch.distributed, counted as the collectives are called
(docs/compression.md#everything-on-the-wire).

`WireCounter.install()` wraps torch.distributed's tensor collectives (in `torch.distributed` and
`distributed_c10d`, where the object collectives look them up), so distlip's own calls (the
compressed or dense exchange, loss and metric sums, certificate norms, checkpoint gathers) and
DeepSpeed's (`deepspeed.comm` calls these functions, and keeps some it looks up once: install
before `deepspeed.init_distributed`) are counted alike, each under the category that is current
(`with counter.category("eval"):`). The TCP store (rendezvous, liveness) is not a collective
and is not counted.

Bytes are the payload one rank sends and receives, by algorithm (n: the tensor's bytes, M: the
group's size), measured on gloo over a veth at M = 2 to within 0.3%:
- all-reduce (ring): 2·(M−1)/M·n each way;
- reduce: a reduce-scatter, then the chunks gathered at the root: every rank (M−1)/M·n each way,
  plus n/M sent by each other rank and (M−1)/M·n more received by the root;
- broadcast (chain): the root sends n; the others receive n and forward it, (M−2)/(M−1)·n sent
  each on average;
- all-gather: (M−1)·n each way (n: one rank's part);
- reduce-scatter of an input of n bytes: NCCL's ring (M−1)/M·n each way; gloo runs it as an
  all-reduce of the whole input, 2·(M−1)/M·n (measured);
- all-to-all: the pieces for and from the other ranks, exactly;
- send / recv, gather / scatter: the tensors themselves; barrier: no payload.
Each call also costs protocol headers (about 0.5 kB per small gloo all-reduce at M = 2) that
are not payload; `calls` counts them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import defaultdict

import torch.distributed as dist
from torch import Tensor

from distlip.compress.accounting import all_gather_bytes, ring_all_reduce_bytes

WRAPPED = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
           "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base",
           "all_to_all_single", "all_to_all", "send", "recv", "isend", "irecv", "gather", "scatter", "barrier",
           "all_reduce_coalesced")
TRAIN = "train"
_installed: list[WireCounter] = []  # at most one: a later install replaces the earlier one


def _arg(args: tuple, kwargs: dict, index: int, *names: str):
    if len(args) > index:
        return args[index]
    return next((kwargs[n] for n in names if kwargs.get(n) is not None), None)


def _group_of(args: tuple, kwargs: dict, index: int):
    return _arg(args, kwargs, index, "group")


def _is_root(root: int | None, group, kwargs: dict) -> bool:
    """Whether this rank is the collective's root (`root` a global rank, or group_src/group_dst)."""
    local = kwargs.get("group_src", kwargs.get("group_dst"))
    if local is not None:
        return dist.get_rank(group) == local
    return dist.get_rank() == root


def payload(name: str, args: tuple, kwargs: dict) -> tuple[float, float]:
    """(sent, received) payload bytes of one call of torch.distributed.`name` on this rank."""
    if name == "barrier":
        return 0.0, 0.0
    if name in ("send", "isend"):
        return float(args[0].nbytes if args else kwargs["tensor"].nbytes), 0.0
    if name in ("recv", "irecv"):
        return 0.0, float(args[0].nbytes if args else kwargs["tensor"].nbytes)
    group_index = {"all_reduce": 2, "reduce": 3, "broadcast": 2, "all_gather": 2, "all_gather_into_tensor": 2,
                   "_all_gather_base": 2, "reduce_scatter": 3, "reduce_scatter_tensor": 3,
                   "reduce_scatter_single": 3, "_reduce_scatter_base": 3, "all_to_all_single": 4, "all_to_all": 2,
                   "gather": 3, "scatter": 3, "all_reduce_coalesced": 2}[name]
    group = _group_of(args, kwargs, group_index)
    m = dist.get_world_size(group)
    if m == 1:
        return 0.0, 0.0
    share = (m - 1) / m
    if name == "all_reduce":
        n = ring_all_reduce_bytes(_arg(args, kwargs, 0, "tensor").nbytes, m)
        return n, n
    if name == "all_reduce_coalesced":
        n = ring_all_reduce_bytes(sum(t.nbytes for t in _arg(args, kwargs, 0, "tensors")), m)
        return n, n
    if name == "reduce":
        n = _arg(args, kwargs, 0, "tensor").nbytes
        if _is_root(_arg(args, kwargs, 1, "dst"), group, kwargs):
            return share * n, 2 * share * n
        return share * n + n / m, share * n
    if name == "broadcast":
        n = _arg(args, kwargs, 0, "tensor").nbytes
        if _is_root(_arg(args, kwargs, 1, "src"), group, kwargs):
            return float(n), 0.0
        return (m - 2) / (m - 1) * n, float(n)
    if name == "all_gather":
        n = all_gather_bytes(_arg(args, kwargs, 1, "tensor").nbytes, m)
        return n, n
    if name in ("all_gather_into_tensor", "_all_gather_base"):
        n = all_gather_bytes(_arg(args, kwargs, 1, "input_tensor", "input").nbytes, m)
        return n, n
    if name in ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base", "reduce_scatter"):
        inputs = _arg(args, kwargs, 1, "input", "input_list")
        n = sum(t.nbytes for t in inputs) if isinstance(inputs, (list, tuple)) else inputs.nbytes
        # gloo runs a reduce-scatter as a whole all-reduce
        n = ring_all_reduce_bytes(n, m) if dist.get_backend(group) == "gloo" else share * n
        return n, n
    if name == "all_to_all_single":
        out, inp = _arg(args, kwargs, 0, "output"), _arg(args, kwargs, 1, "input")
        me = dist.get_rank(group)
        return _others(inp, _arg(args, kwargs, 3, "input_split_sizes"), m, me), \
            _others(out, _arg(args, kwargs, 2, "output_split_sizes"), m, me)
    if name == "all_to_all":
        outs, ins = _arg(args, kwargs, 0, "output_tensor_list"), _arg(args, kwargs, 1, "input_tensor_list")
        me = dist.get_rank(group)
        return (float(sum(t.nbytes for r, t in enumerate(ins) if r != me)),
                float(sum(t.nbytes for r, t in enumerate(outs) if r != me)))
    n = _arg(args, kwargs, 0, "tensor").nbytes
    root = _is_root(_arg(args, kwargs, 2, "dst" if name == "gather" else "src"), group, kwargs)
    if name == "gather":
        return (0.0, (m - 1) * n) if root else (float(n), 0.0)
    return ((m - 1) * n, 0.0) if root else (0.0, float(n))  # scatter


def _others(t: Tensor, splits, m: int, me: int) -> float:
    """Bytes of the pieces of flat `t` that belong to the other ranks."""
    rows = t.shape[0] if t.dim() else 1
    per_row = t.nbytes / max(rows, 1)
    sizes = list(splits) if splits else [rows // m] * m
    return float(sum(s for r, s in enumerate(sizes) if r != me) * per_row)


class WireCounter:
    """Per-rank payload bytes (sent, received) and calls of every torch.distributed collective,
    by category. `install()` wraps the functions (idempotent); `uninstall()` restores them."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = defaultdict(float)
        self.received: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._category = TRAIN
        self._inside = threading.local()  # a wrapped call made from inside another is counted once
        self._originals: dict[str, object] = {}

    @contextlib.contextmanager
    def category(self, name: str):
        """Count the collectives inside under `name` (default "train")."""
        before, self._category = self._category, name
        try:
            yield
        finally:
            self._category = before

    def install(self) -> WireCounter:
        for other in [c for c in _installed if c is not self]:
            other.uninstall()
        for name in WRAPPED:
            if name in self._originals or not hasattr(dist, name):
                continue
            original = getattr(dist, name)
            self._originals[name] = original
            wrapped = self._wrap(name, original)
            setattr(dist, name, wrapped)
            setattr(dist.distributed_c10d, name, wrapped)
        if self not in _installed:
            _installed.append(self)
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
            setattr(dist.distributed_c10d, name, original)
        self._originals = {}
        if self in _installed:
            _installed.remove(self)

    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if getattr(self._inside, "active", False):
                return original(*args, **kwargs)
            self._inside.active = True
            try:
                sent, received = payload(name, args, kwargs)
                self.sent[self._category] += sent
                self.received[self._category] += received
                self.calls[self._category] += 1
                return original(*args, **kwargs)
            finally:
                self._inside.active = False
        return counted

    @property
    def total_sent(self) -> float:
        return sum(self.sent.values())

    @property
    def total_received(self) -> float:
        return sum(self.received.values())

    def log_fields(self) -> dict[str, float]:
        """Cumulative figures for a metrics record: `wire_bytes_total` (the busier direction,
        max(sent, received), over every category), `wire_sent_total`, `wire_received_total`,
        `wire_calls_total`, and per category `wire_<category>_bytes_total`."""
        out = {"wire_bytes_total": max(self.total_sent, self.total_received), "wire_sent_total": self.total_sent,
               "wire_received_total": self.total_received, "wire_calls_total": float(sum(self.calls.values()))}
        for cat in sorted(set(self.sent) | set(self.received)):
            out[f"wire_{cat}_bytes_total"] = max(self.sent[cat], self.received[cat])
        return out

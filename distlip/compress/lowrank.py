"""Low-rank gradient compression with error feedback, reduced by all-reduce (docs/compression.md#low-rank).

PowerSGD (Vogels, Karimireddy, Jaggi 2019) with the warm start Dion also uses (Ahn et al. 2025).
For each matrix of shape (m, n), at rank r, every rank m' of M holds its gradient g and its
residual e, and all ranks share Q (n, r):

    X = g + e                        this rank's matrix, with what earlier steps left out
    P = Σ over ranks of X·Q          one all-reduce of (m, r) factors
    P̂ = orthonormal basis of P       Householder QR of bits that are identical on every rank
    Q = mean over ranks of Xᵀ·P̂      one all-reduce of (n, r) factors
    aggregate = P̂·Qᵀ                 = P̂·P̂ᵀ·mean X, the same bits on every rank
    e ← X − P̂·Qᵀ                     this rank's residual (the published form: the aggregate, not
                                     this rank's own projection, is subtracted)

Q is kept for the next step, so one power iteration per step refines a subspace that carries
over. Every rank sends r·(m + n) values per matrix, and an all-reduce moves 2·(M − 1)/M of
that per rank, whatever M: it does not grow with the number of ranks as gathered sparse
messages do. At r = min(m, n) the aggregate is the dense mean: P̂ then spans the mean's columns.

Tensors that are not matrices, or whose factors would be no smaller than themselves
(r·(m + n) ≥ m·n), travel whole in the first all-reduce: they are exact. Dense rounds (the
first call for a tensor and every step below `warmup_steps`) send every tensor whole; Q then
follows the mean gradient by one power iteration computed locally (no bytes), so compression
starts from a warm subspace.

Every rank gets every aggregate, bit for bit: the engine steps every matrix on every rank from
it (no owner, no weights sent back). State per tensor: "q" (shared), "e" (this rank's), "step".
"""

from __future__ import annotations

import torch
from torch import Tensor

from distlip.compress.accounting import UPLINK, ByteCounter, ring_all_reduce_bytes
from distlip.compress.transport import Comm, SingleProcessComm
from distlip.errors import ConfigError
from distlip.seeds import stream_seed

State = dict[str, Tensor]


def check_rank(rank: int | None, fraction: float) -> None:
    """Raise ConfigError unless `rank` is None or an integer ≥ 1, and (without a rank) `fraction` is in (0, 1]."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"compression.rank must be an integer ≥ 1, got {rank!r}: e.g. 4, or leave it unset "
                          "and give compression.ratio as the fraction of each matrix's smaller side")
    if rank is None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                         or not 0.0 < fraction <= 1.0):
        raise ConfigError(f"compression.ratio (the low-rank fraction of each matrix's smaller side) must be in "
                          f"(0, 1], got {fraction!r}: e.g. 0.05, or set compression.rank")


def factor_rank(name: str, shape: tuple[int, ...], rank: int | None, fraction: float) -> int | None:
    """The rank r used for tensor `name` of `shape`: `rank`, or round(fraction·min(m, n)) (≥ 1);
    None for a tensor that is not a matrix. Raises ConfigError when r is above min(m, n)."""
    if len(shape) != 2:
        return None
    side = min(shape)
    r = rank if rank is not None else max(1, round(fraction * side))
    if r > side:
        raise ConfigError(f"compression.rank={r} is larger than matrix {name} of shape {tuple(shape)} allows "
                          f"(at most {side}): lower compression.rank to ≤ {side}")
    return r


def factors_pay(shape: tuple[int, ...], r: int | None) -> bool:
    """Whether rank-r factors of a tensor of `shape` are smaller than the tensor: r·(m + n) < m·n."""
    return r is not None and r * (shape[0] + shape[1]) < shape[0] * shape[1]


def initial_q(seed: int, name: str, n: int, r: int) -> Tensor:
    """The starting (n, r) Q of tensor `name`: Gaussian from (seed, name), the same on every rank."""
    gen = torch.Generator().manual_seed(stream_seed(seed, name, "lowrank"))
    return torch.randn(n, r, generator=gen)


def orthonormal(p: Tensor) -> Tensor:
    """An orthonormal basis (m, r) of the columns of `p` (m, r), r ≤ m: reduced Householder QR,
    which gives r orthonormal columns even when `p` is rank-deficient (zero, say)."""
    return torch.linalg.qr(p, mode="reduced").Q


def factor_mean(comm: Comm, xs: list[Tensor], qs: list[Tensor], counter: ByteCounter | None = None,
                extra: Tensor | None = None) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """One power iteration of the mean of every rank's matrices, by two all-reduces.

    xs: this rank's matrices (m_i, n_i); qs: the shared (n_i, r_i) factors, the same on every
    rank. Returns (P̂_i (m_i, r_i) orthonormal, Q̄_i (n_i, r_i) = mean Xᵀ·P̂_i, and the mean of
    `extra`, a flat tensor summed in the first all-reduce alongside the P factors). P̂·Q̄ᵀ is
    the rank-r approximation of mean X in the subspace Q leads to, identical on every rank.
    Records the all-reduces' bytes in `counter` (the dense figure is left to the caller).
    """
    world = comm.world_size
    ps = [x @ q for x, q in zip(xs, qs)]
    first = torch.cat([p.reshape(-1) for p in ps] + ([extra] if extra is not None else []))
    comm.all_reduce_sum(first)
    sizes = [p.numel() for p in ps]
    parts = first.split(sizes + ([extra.numel()] if extra is not None else []))
    p_hats = [orthonormal(part.view_as(p)) for part, p in zip(parts, ps)]
    local_qs = [x.T @ p_hat for x, p_hat in zip(xs, p_hats)]
    second = torch.cat([q.reshape(-1) for q in local_qs]) if local_qs else first.new_zeros(0)
    if local_qs:
        comm.all_reduce_sum(second)
    q_bars = [part.view_as(q).div_(world) for part, q in zip(second.split([q.numel() for q in local_qs]), local_qs)]
    if counter is not None:
        cost = ring_all_reduce_bytes(first.nbytes, world) + (ring_all_reduce_bytes(second.nbytes, world)
                                                              if local_qs else 0.0)
        counter.add(UPLINK, sent=cost, received=cost, dense_sent=0.0, dense_received=0.0)
    mean_extra = parts[-1].div_(world) if extra is not None else None
    return p_hats, q_bars, mean_extra


class LowRank:
    """The low-rank uplink: `aggregate_many` like an `Estimator`, but every rank gets every aggregate.

    rank: r for every matrix; or None, and r = max(1, round(fraction·min(m, n))) per matrix.
    comm, warmup_steps, seed (for the initial Q), counter: as for `Estimator`.
    """

    name = "lowrank"

    def __init__(self, rank: int | None = None, fraction: float = 1.0, comm: Comm | None = None, *,
                 warmup_steps: int = 0, seed: int = 0, counter: ByteCounter | None = None) -> None:
        check_rank(rank, fraction)
        self.rank, self.fraction = rank, fraction
        self.comm = comm if comm is not None else SingleProcessComm()
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.counter = counter if counter is not None else ByteCounter()
        self._state: dict[str, State] = {}

    def __repr__(self) -> str:
        return f"LowRank(rank={self.rank}, fraction={self.fraction})"

    def rank_of(self, name: str, shape: tuple[int, ...]) -> int | None:
        """r for tensor `name` of `shape` when it travels as factors, None when it travels whole."""
        r = factor_rank(name, shape, self.rank, self.fraction)
        return r if factors_pay(shape, r) else None

    def needs_previous(self, sizes: dict[str, int], step: int) -> bool:
        return False

    @torch.no_grad()
    def aggregate_many(self, grads: dict[str, Tensor], *, step: int, owners: dict[str, int] | None = None,
                       previous: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The aggregate of every tensor in `grads` (fp32, any shape) at optimiser `step`, on every
        rank (`owners` is accepted for the `Estimator` interface and ignored: there is no owner).
        Every rank passes the same names, shapes and order at the same steps."""
        world = self.comm.world_size
        factored, whole = [], []
        for name, g in grads.items():
            r = self.rank_of(name, tuple(g.shape))
            dense_round = "step" not in self._state.get(name, {}) or step < self.warmup_steps
            (whole if r is None or dense_round else factored).append(name)
            state = self._state.setdefault(name, {})
            if r is not None and "q" not in state:
                state["q"] = initial_q(self.seed, name, g.shape[1], r).to(g.device, g.dtype)
            state["step"] = torch.tensor(step)
        xs = []
        for name in factored:
            e = self._state[name].get("e")
            xs.append(grads[name].clone() if e is None else grads[name] + e.view_as(grads[name]))
        flat_whole = (torch.cat([grads[n].reshape(-1) for n in whole]) if whole
                      else next(iter(grads.values())).new_zeros(0))
        p_hats, q_bars, mean_whole = factor_mean(self.comm, xs, [self._state[n]["q"] for n in factored],
                                                 self.counter, flat_whole)
        dense = ring_all_reduce_bytes(sum(g.numel() * g.element_size() for g in grads.values()), world)
        self.counter.add(UPLINK, sent=0.0, received=0.0, dense_sent=dense, dense_received=dense)
        out = {}
        for name, x, p_hat, q_bar in zip(factored, xs, p_hats, q_bars):
            aggregate = p_hat @ q_bar.T
            state = self._state[name]
            state["e"] = x.sub_(aggregate).reshape(-1)
            state["q"] = q_bar.clone()  # not a view of the whole all-reduce buffer
            out[name] = aggregate
        for name, mean in zip(whole, mean_whole.split([grads[n].numel() for n in whole])):
            mean = mean.view_as(grads[name])
            state = self._state[name]
            state.pop("e", None)
            if "q" in state:  # follow the mean by one local power iteration: warm when compression starts
                state["q"] = mean.T @ orthonormal(mean @ state["q"])
            out[name] = mean
        return {name: out[name] for name in grads}

    def state_dict(self) -> dict[str, State]:
        """Per-tensor state keyed by name: {name: {"q", "e", "step"}} (references, not copies)."""
        return self._state

    def load_state_dict(self, state: dict[str, State]) -> None:
        self._state = {name: {key: t.clone() for key, t in fields.items()} for name, fields in state.items()}

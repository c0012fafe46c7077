"""Compressors, estimators and byte accounting in one process (docs/compression.md#formulas).

Multi-worker behaviour is simulated with one thread per worker over an in-memory `Comm`
(`ThreadGroup`); the real 2-process gloo checks live in test_compress_dist.py.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from distlip.compress import (
    ByteCounter,
    Dense,
    Diana,
    Downlink,
    EF14,
    EF21Momentum,
    Identity,
    Marina,
    Plain,
    RandK,
    TopK,
    build,
    check,
    estimator_name,
    make_compressor,
    validate,
)
from distlip.config import CompressionConfig, load_config
from distlip.compress.accounting import all_gather_bytes, ring_all_reduce_bytes
from distlip.compress.compressors import FILTER_MIN_D, INDEX_BYTES, sample_without_replacement, top_magnitudes
from distlip.errors import ConfigError

# Tolerance for Monte-Carlo means, in standard errors (the draws are seeded, so fixed).
Z = 5.0


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


class OnePassMarina(Marina):
    """MARINA against the previous step's gradient, for checks that pass one gradient per step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, same_batch=False, **kwargs)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so comparisons see -0.0 and NaN payloads."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _magnitude_cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    d = 2 * FILTER_MIN_D + 7
    u, v = torch.randn(512, generator=gen), torch.randn(d // 512, generator=gen)
    return {
        "gaussian": torch.randn(d, generator=gen),
        "bf16 (many ties)": torch.randn(d, generator=gen).to(torch.bfloat16),
        "rank one, rows alike": torch.cat([torch.outer(u, v).reshape(-1), torch.zeros(d % 512)]),
        "heavy tail": torch.randn(d, generator=gen) ** 5,
        "constant": torch.full((d,), 0.5),
        "mostly zero": torch.zeros(d).index_fill_(0, torch.arange(0, d, 97), 1.0),
    }


@pytest.mark.parametrize("case", list(_magnitude_cases()))
@pytest.mark.parametrize("ratio", [0.01, 0.1])
def test_top_magnitudes_picks_what_torch_topk_picks(case, ratio, monkeypatch):
    """The CPU shortcut (a sampled threshold, then torch.topk over the survivors, or the threshold's
    ties when fewer than k survive) keeps k distinct coordinates whose magnitudes are torch.topk's,
    ties included, and never runs torch.topk on more than a few k coordinates, even when most of
    the input is zero or equal."""
    x = _magnitude_cases()[case]
    d, k = x.numel(), round(ratio * x.numel())
    want = torch.topk(x.abs(), k, sorted=False).indices
    sizes, topk = [], torch.topk
    monkeypatch.setattr(torch, "topk", lambda a, *args, **kw: sizes.append(a.numel()) or topk(a, *args, **kw))
    got = top_magnitudes(x, k)
    assert got.numel() == k and got.unique().numel() == k
    assert torch.equal(x.abs()[got].sort().values, x.abs()[want].sort().values)
    assert max(sizes, default=0) < 3 * k < d


def draws(compressor, x, n):
    """n independent compressions of x (different steps), decompressed: (n, d)."""
    d = x.numel()
    return torch.stack([compressor.decompress(compressor.compress(x, step=s, tensor_id="x", rank=0), d) for s in range(n)])


# ---------------------------------------------------------------- compressors


def test_randk_is_unbiased_with_variance_omega():
    d, n = 50, 10000
    x = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = RandK(0.1, seed=1)
    omega = q.omega(d)
    assert omega == pytest.approx(d / 5 - 1)
    samples = draws(q, x, n)
    # Coordinate i is (d/k)·x_i with probability k/d, else 0: variance x_i²·ω.
    stderr = (x.pow(2) * omega / n).sqrt()
    assert ((samples.mean(0) - x).abs() <= Z * stderr).all()
    sq_err = (samples - x).pow(2).sum(1)
    assert abs(sq_err.mean() - omega * x.pow(2).sum()) <= Z * sq_err.std() / math.sqrt(n)


def test_unscaled_randk_contracts_in_expectation():
    d, n = 50, 10000
    x = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = RandK(0.1, scaled=False)
    assert c.delta(d) == 0.1 and c.omega(d) is None and c.contractive and not c.unbiased
    sq_err = (draws(c, x, n) - x).pow(2).sum(1)
    expected = (1 - c.delta(d)) * x.pow(2).sum()
    assert abs(sq_err.mean() - expected) <= Z * sq_err.std() / math.sqrt(n)


@pytest.mark.parametrize("d,ratio", [(1, 0.5), (10, 0.3), (1000, 0.01), (4097, 0.2)])
def test_topk_contracts_and_keeps_largest(d, ratio):
    x = torch.randn(d, generator=torch.Generator().manual_seed(d))
    c = TopK(ratio)
    k = c.k(d)
    assert k == max(1, round(ratio * d))
    y = c.decompress(c.compress(x, step=0, tensor_id=0, rank=0), d)
    assert (y - x).pow(2).sum() <= (1 - k / d) * x.pow(2).sum() * (1 + 1e-6)
    kept = y != 0
    assert kept.sum() == k
    if k < d:
        assert x[kept].abs().min() >= x[~kept].abs().max()


@pytest.mark.parametrize("d,k", [(8, 2), (40, 3), (8, 5)])  # the last takes the randperm branch (4k > d)
def test_sampling_without_replacement_is_uniform_over_subsets(d, k):
    """Every k-subset of [0, d) comes up equally often (each count within Z standard errors),
    and every draw holds k distinct coordinates in range."""
    gen = torch.Generator().manual_seed(11)
    n = 20000
    counts: dict[tuple, int] = {}
    for _ in range(n):
        s = sample_without_replacement(d, k, gen).tolist()
        assert len(set(s)) == k and all(0 <= i < d for i in s)
        key = tuple(sorted(s)) if math.comb(d, k) <= 100 else tuple(sorted(s))[:1]  # smallest element otherwise
        counts[key] = counts.get(key, 0) + 1
    if math.comb(d, k) <= 100:
        p = 1 / math.comb(d, k)
        assert len(counts) == math.comb(d, k)
        expected = {key: p for key in counts}
    else:  # P(min = m) = C(d−1−m, k−1) / C(d, k)
        expected = {(m,): math.comb(d - 1 - m, k - 1) / math.comb(d, k) for m in range(d - k + 1)}
    for key, p in expected.items():
        assert abs(counts.get(key, 0) - n * p) <= Z * math.sqrt(n * p * (1 - p)), (key, counts.get(key, 0), n * p)


def test_masks_shared_or_per_rank_and_private():
    shared, own = RandK(0.1, seed=7), RandK(0.1, shared_seed=False, seed=7)
    before = torch.random.get_rng_state()
    a = shared.mask(1000, step=3, tensor_id="w", rank=0)
    assert torch.equal(a, shared.mask(1000, step=3, tensor_id="w", rank=1))
    assert not torch.equal(a, shared.mask(1000, step=4, tensor_id="w", rank=0))
    assert not torch.equal(a, shared.mask(1000, step=3, tensor_id="v", rank=0))
    assert not torch.equal(own.mask(1000, step=3, tensor_id="w", rank=0), own.mask(1000, step=3, tensor_id="w", rank=1))
    assert a.unique().numel() == 100 and a.dtype == torch.int32
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is never touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_message_bytes_match_what_is_sent(dtype):
    d, k = 1000, 10
    x = torch.randn(d).to(dtype)
    item = dtype.itemsize
    cases = {
        Identity(): d * item,
        RandK(0.01): k * item,  # shared mask: values only
        RandK(0.01, shared_seed=False): k * (item + INDEX_BYTES),
        RandK(0.01, scaled=False): k * item,
        TopK(0.01): k * (item + INDEX_BYTES),
        TopK(1.0): d * item,
    }
    for c, expected in cases.items():
        m = c.compress(x, step=0, tensor_id="x", rank=0)
        sent = m.values.numel() * m.values.element_size()
        if m.indices is not None and not m.shared:
            sent += m.indices.numel() * m.indices.element_size()
        assert c.message_bytes(d, dtype) == sent == expected, c


def test_spec_byte_figures():
    """docs/compression.md#formulas: 162M parameters, 8 ranks, bf16."""
    d, world = 162_000_000, 8
    dense = ring_all_reduce_bytes(d * 2, world)
    randk = ring_all_reduce_bytes(RandK(0.01).message_bytes(d, torch.bfloat16), world)
    topk = all_gather_bytes(TopK(0.01).message_bytes(d, torch.bfloat16), world)
    assert (round(dense / 1e6), round(randk / 1e6, 1), round(topk / 1e6)) == (567, 5.7, 68)


@pytest.mark.parametrize("c", [Identity(), RandK(1.0), RandK(1.0, scaled=False, shared_seed=False), TopK(1.0)])
def test_ratio_one_is_identity_bit_for_bit(c):
    x = torch.randn(257)
    x[:4] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-45])
    m = c.compress(x, step=5, tensor_id="x", rank=1)
    assert m.indices is None and c.message_bytes(257, x.dtype) == 257 * 4
    assert torch.equal(bits(c.decompress(m, 257)), bits(x))


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_bad_ratio(ratio):
    with pytest.raises(ConfigError, match=r"ratio must be in \(0, 1\]"):
        RandK(ratio)
    with pytest.raises(ConfigError):
        TopK(ratio)


# ---------------------------------------------------------------- validation


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'randk'"):
        validate("rand_k", "diana", 0.01)
    with pytest.raises(ConfigError, match="did you mean 'marina'"):
        validate("randk", "marnia", 0.01)
    with pytest.raises(ConfigError, match="did you mean 'warmup_steps'"):
        load_config(overrides=["compression.compressor=topk", "compression.ratio=0.01", "compression.warmup=5"])


@pytest.mark.parametrize(
    "compressor,estimator",
    [("topk", "diana"), ("randk_unscaled", "marina"), ("randk", "ef21"), ("randk", "ef14"), ("topk", "dense")],
)
def test_nonsensical_pairs_are_refused(compressor, estimator):
    with pytest.raises(ConfigError, match=f"estimator '{estimator}' needs"):
        validate(compressor, estimator, 0.01)


def test_plain_is_refused_where_it_fails_unless_allowed():
    with pytest.raises(ConfigError, match="diverges at normal learning rates.*diana or marina.*allow_plain"):
        validate("randk", "plain", 0.01)
    with pytest.raises(ConfigError, match="ef21 or ef14.*allow_plain"):
        validate("topk", "plain", 0.01)
    validate("randk", "plain", 0.01, allow_plain=True)
    validate("randk", "plain", 0.1)
    validate("randk_unscaled", "plain", 0.01)


def test_config_defaults_and_build():
    assert estimator_name(CompressionConfig()) == "dense"
    assert estimator_name(CompressionConfig(compressor="randk", ratio=0.01)) == "diana"
    assert estimator_name(CompressionConfig(compressor="topk", ratio=0.01)) == "ef21"
    counter = ByteCounter()
    cfg = CompressionConfig(compressor="randk", ratio=0.01, estimator="marina", marina_p=0.2, downlink="topk",
                            downlink_ratio=0.05, warmup_steps=3)
    uplink, downlink = build(cfg, counter=counter)
    assert isinstance(uplink, Marina) and uplink.p == 0.2 and uplink.warmup_steps == 3
    assert isinstance(downlink, Downlink) and uplink.counter is counter is downlink.counter
    assert build(CompressionConfig())[1] is None
    with pytest.raises(ConfigError, match="not contractive"):
        check(CompressionConfig(downlink="randk", downlink_ratio=0.1))
    with pytest.raises(ConfigError, match="marina_p"):
        check(CompressionConfig(compressor="randk", ratio=0.01, estimator="marina", marina_p=0.0))
    with pytest.raises(ConfigError, match="ratio 1.0"):
        make_compressor("identity", 0.5)


# ---------------------------------------------------------------- estimators

ESTIMATOR_PAIRS = [
    (Dense, Identity()),
    (Plain, RandK(0.05, shared_seed=False)),
    (Diana, RandK(0.05)),
    (Diana, RandK(0.05, shared_seed=False)),
    (OnePassMarina, RandK(0.05, shared_seed=False)),
    (EF21Momentum, TopK(0.05)),
    (EF14, RandK(0.05, scaled=False)),
]


@pytest.mark.parametrize("cls,compressor", ESTIMATOR_PAIRS)
def test_state_dict_resumes_exactly(cls, compressor):
    grads = torch.randn(8, 2, 40, generator=torch.Generator().manual_seed(2))
    full, first = cls(compressor), cls(compressor)
    outs = [full.aggregate(f"p{i}", grads[s, i], step=s) for s in range(8) for i in range(2)]
    for s in range(4):
        for i in range(2):
            first.aggregate(f"p{i}", grads[s, i], step=s)
    resumed = cls(compressor)
    resumed.load_state_dict(first.state_dict())
    again = [resumed.aggregate(f"p{i}", grads[s, i], step=s) for s in range(4, 8) for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(outs[8:], again))


def test_warmup_is_dense_then_compressed():
    d, warmup = 100, 3

    def worker(comm):
        est = Diana(RandK(0.1), comm, warmup_steps=warmup)
        sent = []
        for step in range(warmup + 2):
            est.counter.reset()
            est.aggregate("w", torch.randn(d), step=step)
            sent.append(est.counter.uplink.sent)
        return sent, est.counter.uplink.dense_sent

    sent, dense = ThreadGroup(2).run(worker)[0]
    assert sent == [dense] * warmup + [ring_all_reduce_bytes(10 * 4, 2)] * 2


@pytest.mark.parametrize(
    "cls,compressor",
    [
        (Dense, Identity()), (Plain, Identity()), (Plain, RandK(1.0)), (Plain, TopK(1.0)),
        (Diana, Identity()), (Diana, RandK(1.0, shared_seed=False)), (Marina, RandK(1.0)),
        (EF21Momentum, TopK(1.0)), (EF21Momentum, RandK(1.0, scaled=False)), (EF14, TopK(1.0)),
    ],
)
def test_ratio_one_estimators_equal_dense_on_three_workers(cls, compressor):
    grads = torch.randn(3, 6, 33, generator=torch.Generator().manual_seed(3))

    def worker(comm):
        dense, est = Dense(None, comm), cls(compressor, comm, warmup_steps=2)
        return [(dense.aggregate("w", grads[comm.rank, s], step=s), est.aggregate("w", grads[comm.rank, s], step=s))
                for s in range(6)]

    for rank_result in ThreadGroup(3).run(worker):
        assert all(torch.equal(bits(a), bits(b)) for a, b in rank_result)


def test_byte_counter_on_four_workers():
    d, world = 400, 4
    cases = {
        "shared": (Plain(RandK(0.01)), ring_all_reduce_bytes(4 * 4, world)),
        "gather": (EF21Momentum(TopK(0.01)), all_gather_bytes(4 * (4 + INDEX_BYTES), world)),
    }
    for est, expected in cases.values():
        def worker(comm, est=est):
            e = type(est)(est.compressor, comm, warmup_steps=1)
            e.aggregate("w", torch.randn(d), step=0)
            e.counter.reset()
            e.aggregate("w", torch.randn(d), step=1)
            return e.counter
        for counter in ThreadGroup(world).run(worker):
            assert counter.uplink_bytes == counter.uplink.sent == counter.uplink.received == expected
            assert counter.dense_bytes == ring_all_reduce_bytes(d * 4, world)


# ------------------------------------------------- simulated multi-worker quadratic

M, D = 4, 200
A = 1 + torch.rand(M, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
B = torch.randn(M, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
X_STAR = (A * B).sum(0) / A.sum(0)  # minimiser of f = mean_m ½ Σ_i A_mi (x_i − B_mi)², L = max A ≤ 2


def relative_error(make, lr, steps):
    """Run compressed gradient descent on the heterogeneous quadratic; ‖x − x*‖/‖x*‖ per step (rank 0).

    Also checks that every worker ends with bit-identical weights.
    """

    def worker(comm):
        est, x, errors = make(comm), torch.zeros(D, dtype=torch.float64), []
        for step in range(steps):
            x = x - lr * est.aggregate("x", A[comm.rank] * (x - B[comm.rank]), step=step)
            errors.append(float((x - X_STAR).norm() / X_STAR.norm()))
        return x, errors

    results = ThreadGroup(M).run(worker)
    assert all(torch.equal(results[0][0], x) for x, _ in results)
    return results[0][1]


def test_plain_randk_one_percent_diverges_at_the_dense_learning_rate():
    """At lr = 1/L dense GD converges in a few steps; scaled Rand-k 1% (ω = 99) blows up."""
    assert relative_error(lambda c: Dense(None, c), 0.5, 60)[-1] < 1e-12
    assert relative_error(lambda c: Plain(RandK(0.01), c), 0.5, 60)[-1] > 1e3


# At 1% no unbiased estimator can use the dense rate: DIANA's and MARINA's admissible step
# shrinks like k/d. At such a step they (and EF21 with Top-k) converge to x* itself, while
# plain Rand-k with per-rank masks stalls: its variance at x* is ω/M·mean‖∇f_m(x*)‖² ≠ 0
# because the workers' gradients differ there.
SMALL_LR, STEPS = 0.01, 1000


@pytest.mark.parametrize(
    "make,target",
    [
        (lambda c: Dense(None, c), 1e-5),
        (lambda c: Diana(RandK(0.01, shared_seed=False), c), 0.05),
        # Deterministic gradients: the previous step's local gradient is the one at the previous
        # point, so the one-pass variant is MARINA exactly.
        (lambda c: Marina(RandK(0.01, shared_seed=False), c, same_batch=False), 1e-3),
        (lambda c: Marina(RandK(0.01), c, same_batch=False), 1e-2),
        (lambda c: EF21Momentum(TopK(0.01), c), 1e-5),
    ],
    ids=["dense", "diana", "marina", "marina-shared", "ef21-topk"],
)
def test_estimators_converge_at_one_percent(make, target):
    errors = relative_error(make, SMALL_LR, STEPS)
    assert errors[-1] < target
    assert errors[-1] < errors[STEPS // 2] < errors[0]  # still improving, not at a floor


def test_plain_randk_one_percent_stalls_at_a_small_learning_rate():
    errors = relative_error(lambda c: Plain(RandK(0.01, shared_seed=False), c), SMALL_LR, STEPS)
    assert min(errors[STEPS // 2:]) > 0.5


def test_ef14_reaches_a_floor_that_shrinks_with_the_step():
    """EF14 has the known heterogeneity floor (∝ lr) that EF21 removes; it does not diverge."""
    # Equal lr·steps, so both runs have had the same time to settle.
    floors = [relative_error(lambda c: EF14(TopK(0.01), c), lr, steps)[-1] for lr, steps in ((0.02, 300), (0.005, 1200))]
    assert floors[1] < floors[0] / 2 < 0.5


def test_downlink_tracks_the_master_on_three_workers():
    steps, d, lr = 30, 300, 0.05
    updates = torch.randn(steps, d, generator=torch.Generator().manual_seed(6))

    def worker(comm):
        down = Downlink(TopK(0.05), comm, warmup_steps=2)
        weights = torch.zeros(d)
        master = torch.zeros(d) if comm.rank == 1 else None
        gaps = []
        for step in range(steps):
            if master is not None:
                master -= lr * updates[step]
            down.sync("w", weights, master, step=step, owner=1)
            if master is not None:
                gaps.append(float((master - weights).norm() / master.norm()))
        return weights, gaps, down.counter

    results = ThreadGroup(3).run(worker)
    assert all(torch.equal(results[0][0], w) for w, _, _ in results)
    gaps = results[1][1]
    assert gaps[1] == 0.0 and max(gaps) < 1.0  # exact during warm-up, then bounded lag
    owner, other = results[1][2], results[0][2]
    message = TopK(0.05).message_bytes(d, torch.float32)
    assert owner.downlink.sent == other.downlink.received == 2 * d * 4 + (steps - 2) * message
    assert owner.downlink.received == other.downlink.sent == 0


# ---------------------------------------------------------------- bucketed and owner-only exchange

# Sizes chosen so one step mixes dense messages (the 1-coordinate tensor, and "late", which
# starts at step 3) with compressed ones; rank 1 owns nothing.
SIZES = {"a": 40, "b": 1, "c": 64, "d": 30, "late": 25}
OWNERS = {"a": 0, "b": 0, "c": 2, "d": 0, "late": 2}


def _step_grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return {n: torch.randn(d, generator=gen) for n, d in SIZES.items() if n != "late" or step >= 3}


@pytest.mark.parametrize(
    "cls,compressor",
    [
        (Dense, Identity()), (Plain, RandK(0.1, shared_seed=False)), (Diana, RandK(0.1)),
        (Diana, RandK(0.1, shared_seed=False)), (OnePassMarina, RandK(0.1)), (EF21Momentum, TopK(0.1)),
        (EF14, TopK(0.1)), (EF21Momentum, RandK(0.1, scaled=False)),
    ],
)
def test_bucketed_and_owner_only_exchanges_equal_per_tensor_aggregation(cls, compressor):
    """Three workers, six steps (two dense warm-up): one `aggregate_many` call per step takes at
    most two collectives and gives every rank the bits of one `aggregate` call per tensor; with
    owners (each compressing its own share too), each owner gets exactly those bits for its
    tensors and other ranks get nothing."""

    def worker(comm):
        single, many, owned = (cls(compressor, comm, warmup_steps=2, exact_own=False) for _ in range(3))
        steps = []
        for step in range(6):
            grads = _step_grads(comm.rank, step)
            ref = {n: single.aggregate(n, g, step=step) for n, g in grads.items()}
            before = len(comm.log)
            got = many.aggregate_many(grads, step=step)
            calls = len(comm.log) - before
            mine = owned.aggregate_many(grads, step=step, owners=OWNERS)
            steps.append((ref, got, calls, mine))
        return steps

    for rank, steps in enumerate(ThreadGroup(3).run(worker)):
        for ref, got, calls, mine in steps:
            assert calls <= 2
            assert set(got) == set(ref) and all(torch.equal(bits(got[n]), bits(ref[n])) for n in ref)
            assert set(mine) == {n for n in ref if OWNERS[n] == rank}
            assert all(torch.equal(bits(mine[n]), bits(ref[n])) for n in mine)


OWN_SIZES, OWN_OWNERS = {"a": 40, "c": 64, "d": 30}, {"a": 0, "c": 2, "d": 0}


@pytest.mark.parametrize("cls,compressor", [(Plain, TopK(0.1)), (Plain, RandK(0.1)), (EF21Momentum, TopK(0.1)),
                                            (EF14, TopK(0.1))])
def test_owners_use_their_own_share_whole(cls, compressor):
    """exact_own (the default): each owner's aggregate is the published one with the owner's own
    message sent uncompressed. Non-owners send what they send with exact_own=False, so their
    states match that run's, which gives the oracles: Plain (g_o + Σ_{m≠o} C(g_m))/M; EF21
    (g_o + Σ_{m≠o} u_m)/M; EF14 (g_o + Σ_{m≠o} c_m)/M with c_m = g_m + e_m − e_m⁺, the owner's
    own residual staying empty. The bytes counted are the same as exact_own=False's."""
    world, steps = 3, 5

    def worker(comm):
        own, ref = cls(compressor, comm, warmup_steps=1), cls(compressor, comm, warmup_steps=1, exact_own=False)
        record = []
        for step in range(steps):
            gen = torch.Generator().manual_seed(100 * comm.rank + step)
            grads = {n: torch.randn(d, generator=gen) for n, d in OWN_SIZES.items()}
            before = {n: ref._state.get(n, {}).get("e", torch.zeros(d)).clone() for n, d in OWN_SIZES.items()}
            ref.aggregate_many(grads, step=step, owners=OWN_OWNERS)
            after = {n: ref._state[n].get("e", torch.zeros(d)) for n, d in OWN_SIZES.items()}
            sent = {n: {"plain": lambda: compressor.decompress(compressor.compress(
                            grads[n], step=step, tensor_id=n, rank=comm.rank), OWN_SIZES[n]),
                        "ef21": lambda: ref._state[n]["u"].clone(),
                        "ef14": lambda: grads[n] + before[n] - after[n]}[cls.name]() for n in grads}
            mine = own.aggregate_many(grads, step=step, owners=OWN_OWNERS)
            own_e = {n: "e" in own._state[n] for n in mine}
            record.append((grads, sent, mine, own_e))
        return record, own.counter.uplink.sent, ref.counter.uplink.sent

    results = ThreadGroup(world).run(worker)
    assert all(own == ref for _, own, ref in results)
    for step in range(1, steps):  # step 0 is the dense warm-up
        for n, owner in OWN_OWNERS.items():
            grads, _, mine, own_e = results[owner][0][step]
            others = sum(results[m][0][step][1][n] for m in range(world) if m != owner)
            torch.testing.assert_close(mine[n], (grads[n] + others) / world, rtol=1e-5, atol=1e-6)
            assert not own_e[n]
            assert all(n not in results[m][0][step][2] for m in range(world) if m != owner)


def test_ef21_sent_shares_follow_their_own_momentum():
    """eta_sent: the shares that go out compressed follow v ← (1−η_sent)v + η_sent·g and the owner's
    own share v ← (1−η)v + η·g, both from the first (dense) gradient; the owner's aggregate is
    (v_o + Σ_{m≠o} u_m)/M, u_m tracking the slow v_m by Top-k (oracle: the EMAs recomputed here)."""
    world, steps, eta, eta_sent = 3, 5, 0.5, 0.1

    def worker(comm):
        est = EF21Momentum(TopK(0.1), comm, warmup_steps=1, eta=eta, eta_sent=eta_sent)
        record = []
        for step in range(steps):
            gen = torch.Generator().manual_seed(100 * comm.rank + step)
            grads = {n: torch.randn(d, generator=gen) for n, d in OWN_SIZES.items()}
            mine = est.aggregate_many(grads, step=step, owners=OWN_OWNERS)
            record.append((grads, {n: (st["v"].clone(), st["u"].clone()) for n, st in est._state.items()}, mine))
        return record

    results = ThreadGroup(world).run(worker)
    ema = {}
    for m in range(world):
        for n, owner in OWN_OWNERS.items():
            rate, v = eta if m == owner else eta_sent, None
            for step in range(steps):
                g = results[m][step][0][n]
                v = g.clone() if v is None else v.lerp(g, rate)
                ema[m, n, step] = v
                torch.testing.assert_close(results[m][step][1][n][0], v)
    for step in range(1, steps):
        for n, owner in OWN_OWNERS.items():
            others = sum(results[m][step][1][n][1] for m in range(world) if m != owner)
            torch.testing.assert_close(results[owner][step][2][n], (ema[owner, n, step] + others) / world,
                                       rtol=1e-5, atol=1e-6)
            assert not torch.equal(others, sum(ema[m, n, step] for m in range(world) if m != owner))  # compressed


def test_owner_only_bytes_are_what_the_collectives_move():
    """Dense messages by reduce-scatter (or by all-reduce where the reduce-scatter's padding would
    cost more), sparse ones by all-to-all: the counter matches the bytes really sent and received,
    per rank, and the dense equivalent is the cheaper collective with every tensor whole."""
    world = 3

    def worker(comm):
        est = EF21Momentum(TopK(0.1), comm, warmup_steps=1)
        est.aggregate_many(_step_grads(comm.rank, 0), step=0, owners=OWNERS)  # dense: by reduce-scatter
        warm = est.counter.uplink.sent, list(comm.moved), comm.log
        est.counter.reset()
        comm.moved, comm.log = [0.0, 0.0], []
        # "late" (25 coordinates) and "b" (1) are dense, the rest Top-k: padding a reduce-scatter to
        # "late" would move 2·25 floats per rank, an all-reduce of the 26 moves 2·(2/3)·26.
        est.aggregate_many(_step_grads(comm.rank, 3), step=3, owners=OWNERS)
        return warm, est.counter.uplink, comm.moved, comm.log

    sizes = {r: 4 * sum(SIZES[n] for n, o in OWNERS.items() if o == r and n != "late") for r in range(world)}
    for (warm_counted, warm_moved, warm_log), traffic, (sent, received), log in ThreadGroup(world).run(worker):
        assert warm_log == ["reduce_scatter_sum"]
        assert warm_counted == warm_moved[0] == (world - 1) * max(sizes.values())  # step 0 had no "late"
        assert log == ["all_reduce_sum", "all_to_all"]
        assert (traffic.sent, traffic.received) == (sent, received)
        everything = 4 * sum(SIZES.values())
        busiest = max(sum(4 * SIZES[n] for n, o in OWNERS.items() if o == r) for r in range(world))
        assert traffic.dense_sent == min(ring_all_reduce_bytes(everything, world), (world - 1) * busiest)
        assert traffic.volume < traffic.dense_volume / 2


def test_sparse_messages_of_narrow_dtypes_pack_and_unpack():
    """bf16 values with an odd k put the int32 indices after a 2-byte gap: the gathered mean
    still equals the mean of each rank's decompressed message."""
    d, ratio = 50, 0.1  # k = 5
    grads = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)

    def worker(comm):
        est = Plain(TopK(ratio), comm)
        est.aggregate_many({f"t{i}": grads[comm.rank, i] for i in range(3)}, step=0)  # the dense first round
        return est.aggregate_many({f"t{i}": grads[comm.rank, i] for i in range(3)}, step=1)

    expected = [sum(TopK(ratio).decompress(TopK(ratio).compress(grads[r, i], step=1, tensor_id=f"t{i}", rank=r), d)
                    for r in range(2)) / 2 for i in range(3)]
    for got in ThreadGroup(2).run(worker):
        assert all(torch.equal(got[f"t{i}"], expected[i]) for i in range(3))


def test_downlink_sends_one_broadcast_per_owner():
    """Four tensors held by two owners: `sync_many` equals one `sync` per tensor, bit for bit,
    in two broadcasts."""
    d, owners = 60, {"p": 0, "q": 1, "r": 0, "s": 1}
    shifts = torch.randn(4, len(owners), d, generator=torch.Generator().manual_seed(8))

    def worker(comm):
        single, many = Downlink(TopK(0.1), comm, warmup_steps=1), Downlink(TopK(0.1), comm, warmup_steps=1)
        w1 = {n: torch.zeros(d) for n in owners}
        w2 = {n: torch.zeros(d) for n in owners}
        masters = {n: torch.zeros(d) for n, o in owners.items() if o == comm.rank}
        calls = []
        for step in range(4):
            for i, n in enumerate(owners):
                if n in masters:
                    masters[n] -= 0.1 * shifts[step, i]
            for n, o in owners.items():
                single.sync(n, w1[n], masters.get(n), step=step, owner=o)
            before = len(comm.log)
            many.sync_many({n: (w2[n], masters.get(n), o) for n, o in owners.items()}, step=step)
            calls.append(len(comm.log) - before)
        return w1, w2, calls

    for w1, w2, calls in ThreadGroup(2).run(worker):
        assert calls == [2] * 4
        assert all(torch.equal(w1[n], w2[n]) for n in owners)


def marina_under_noise(same_batch: bool, sigma: float = 0.5, steps: int = STEPS) -> list[float]:
    """MARINA Rand-k 1% on the quadratic with noisy gradients A(x − B) + σξ_t: ‖x − x*‖/‖x*‖ per step.
    `previous` is the gradient at the previous point on the same noise draw ξ_t."""

    def worker(comm):
        est = Marina(RandK(0.01, shared_seed=False), comm, same_batch=same_batch)
        gen = torch.Generator().manual_seed(50 + comm.rank)
        x = x_prev = torch.zeros(D, dtype=torch.float64)
        errors = []
        for step in range(steps):
            noise = sigma * torch.randn(D, generator=gen, dtype=torch.float64)
            grad = A[comm.rank] * (x - B[comm.rank]) + noise
            before = A[comm.rank] * (x_prev - B[comm.rank]) + noise
            needed = est.needs_previous({"x": D}, step)
            agg = est.aggregate_many({"x": grad}, step=step, previous={"x": before} if needed else None)["x"]
            x_prev, x = x, x - SMALL_LR * agg
            errors.append(float((x - X_STAR).norm() / X_STAR.norm()))
        return errors

    return ThreadGroup(M).run(worker)[0]


def test_marina_on_one_batch_converges_under_noise_and_one_pass_drifts():
    """Both gradients on one noise draw, the difference shrinks with the step and MARINA settles
    near x* (SGD's noise floor); against the previous step's gradient every difference carries
    2σ² of noise, which ω = 99 amplifies and the estimate accumulates between dense rounds."""
    exact, one_pass = marina_under_noise(True), marina_under_noise(False)
    assert max(exact[STEPS // 2:]) < 0.4  # from 1 at the start (measured 0.15-0.30)
    assert min(one_pass[STEPS // 2:]) > 10 * max(exact[STEPS // 2:])  # measured 10-30


def test_marina_on_one_batch_asks_for_the_previous_gradients():
    est = Marina(RandK(0.1))
    assert not est.needs_previous({"w": 50}, step=0)  # the first call is a dense round
    est.aggregate("w", torch.randn(50), step=0)
    assert est.needs_previous({"w": 50}, step=1)
    assert not Marina(RandK(0.1), same_batch=False).needs_previous({"w": 50}, step=1)
    with pytest.raises(ValueError, match="previous weights on this batch"):
        est.aggregate("w", torch.randn(50), step=1)

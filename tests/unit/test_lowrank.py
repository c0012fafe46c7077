"""The low-rank compressor (PowerSGD with error feedback, docs/compression.md#low-rank) in one process:
M ranks as threads over an in-memory `Comm` (helpers.compression.ThreadGroup)."""

from __future__ import annotations

import pytest
import torch

from distlip.compress import ByteCounter, LowRank, build
from distlip.compress.accounting import ring_all_reduce_bytes
from distlip.compress.lowrank import factor_mean, initial_q, orthonormal
from distlip.config import CompressionConfig, load_config
from distlip.errors import ConfigError
from distlip.preflight import check_config

from helpers import ROOT
from helpers.compression import ThreadGroup

SMOKE = ROOT / "configs" / "smoke.yaml"
SHAPES = {"a": (24, 16), "b": (16, 40), "bias": (16,)}


def local_grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s gradients at `step`: different on every rank and step, fp32."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}


def run(world: int, steps: int, make, keep_state: bool = False) -> list:
    """Each rank's aggregates per step (and its state after the last step when `keep_state`)."""
    def worker(comm):
        est = make(comm)
        outs = [est.aggregate_many(local_grads(comm.rank, s), step=s) for s in range(steps)]
        return (outs, est.state_dict(), comm) if keep_state else outs
    return ThreadGroup(world).run(worker)


def dense_mean(world: int, step: int) -> dict[str, torch.Tensor]:
    grads = [local_grads(r, step) for r in range(world)]
    return {n: sum(g[n] for g in grads) / world for n in SHAPES}


def test_factor_path_at_full_rank_is_the_dense_mean():
    """One power iteration at r = min(m, n) through the all-reduced factors: P̂ spans the mean's
    columns, so P̂·Q̄ᵀ is the mean of the ranks' matrices (to rounding), whichever Q it starts from."""
    world, shapes = 3, [(24, 16), (16, 40)]
    qs = [torch.randn(n, min(m, n), generator=torch.Generator().manual_seed(n)) for m, n in shapes]

    def worker(comm):
        gen = torch.Generator().manual_seed(comm.rank)
        xs = [torch.randn(s, generator=gen) for s in shapes]
        p_hats, q_bars, _ = factor_mean(comm, xs, qs)
        return xs, [p @ q.T for p, q in zip(p_hats, q_bars)]

    results = ThreadGroup(world).run(worker)
    for i in range(len(shapes)):
        mean = sum(xs[i] for xs, _ in results) / world
        for _, approx in results:
            torch.testing.assert_close(approx[i], mean, atol=1e-5, rtol=1e-5)


def test_full_rank_estimator_equals_the_dense_mean():
    """ratio 1.0 (r = min(m, n)): factors would be larger than the matrix, so every tensor goes whole."""
    world = 3
    results = run(world, 3, lambda comm: LowRank(None, 1.0, comm))
    for step in range(3):
        want = dense_mean(world, step)
        for outs in results:
            for n in SHAPES:
                torch.testing.assert_close(outs[step][n], want[n], rtol=0, atol=1e-6)


def test_error_feedback_residual_is_the_hand_computed_one():
    """Step 0 is dense (first call): the mean, and Q ← Q̄ᵀ·QR(mean·Q) computed locally. From step 1
    each rank compresses X = g + e, and the test redoes it by hand: P = Σ X·Q, P̂ = QR(P),
    Q̄ = mean Xᵀ·P̂, aggregate P̂·Q̄ᵀ, residual e = X − P̂·Q̄ᵀ, and Q̄ is the next step's Q."""
    world, r, steps, mats = 2, 3, 4, ("a", "b")
    outs = run(world, steps, lambda comm: LowRank(r, comm=comm, seed=5), keep_state=True)
    mean0 = dense_mean(world, 0)
    q = {n: mean0[n].T @ orthonormal(mean0[n] @ initial_q(5, n, SHAPES[n][1], r)) for n in mats}
    residuals: list[dict] = [{n: 0.0 for n in mats} for _ in range(world)]
    for step in range(1, steps):
        xs = [{n: local_grads(rank, step)[n] + residuals[rank][n] for n in mats} for rank in range(world)]
        for n in mats:
            p_hat = orthonormal(sum(x[n] @ q[n] for x in xs))
            q[n] = sum(x[n].T @ p_hat for x in xs) / world
            aggregate = p_hat @ q[n].T
            for rank in range(world):
                torch.testing.assert_close(outs[rank][0][step][n], aggregate, atol=1e-5, rtol=1e-5)
                residuals[rank][n] = xs[rank][n] - aggregate
        for rank in range(world):  # not a matrix: the dense mean, no residual
            torch.testing.assert_close(outs[rank][0][step]["bias"], dense_mean(world, step)["bias"], rtol=0, atol=1e-6)
    for rank in range(world):
        state = outs[rank][1]
        for n in mats:
            torch.testing.assert_close(state[n]["e"].view(SHAPES[n]), residuals[rank][n], atol=1e-5, rtol=1e-5)
            assert state[n]["e"].norm() > 0.1 * local_grads(rank, steps - 1)[n].norm()  # rank 3 of 16 drops much
        assert "e" not in state["bias"] and "q" not in state["bias"]


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_the_same_bits(world):
    results = run(world, 4, lambda comm: LowRank(2, comm=comm))
    for outs in results[1:]:
        for step in range(4):
            for n in SHAPES:
                assert torch.equal(outs[step][n], results[0][step][n]), (world, step, n)


def test_bytes_are_two_all_reduces_of_the_factors():
    """Per rank and step after the dense round: all-reduce of every P (m·r) with the whole tensors,
    then of every Q (n·r), fp32; the dense figure is one all-reduce of everything."""
    world, r = 4, 2

    def worker(comm):
        counter = ByteCounter()
        est = LowRank(r, comm=comm, counter=counter)
        est.aggregate_many(local_grads(comm.rank, 0), step=0)
        counter.reset()
        est.aggregate_many(local_grads(comm.rank, 1), step=1)
        return counter, comm.moved

    counter, moved = ThreadGroup(world).run(worker)[0]
    first = (24 * r + 16 * r + 16) * 4
    second = (16 * r + 40 * r) * 4
    want = ring_all_reduce_bytes(first, world) + ring_all_reduce_bytes(second, world)
    assert counter.uplink_bytes == pytest.approx(want) and counter.downlink_bytes == 0
    dense = ring_all_reduce_bytes((24 * 16 + 16 * 40 + 16) * 4, world)
    assert counter.uplink.dense_volume == pytest.approx(dense)
    assert moved[0] == pytest.approx(dense + want)  # what the fake moved: the dense round, then the factors


def test_resume_continues_bit_for_bit():
    """State after step 1 loaded into a fresh estimator: steps 2 and 3 match the uninterrupted run."""
    world = 2

    def worker(comm):
        a = LowRank(3, comm=comm)
        outs = [a.aggregate_many(local_grads(comm.rank, s), step=s) for s in range(4)]
        b = LowRank(3, comm=comm)
        b.aggregate_many(local_grads(comm.rank, 0), step=0)
        b.aggregate_many(local_grads(comm.rank, 1), step=1)
        c = LowRank(3, comm=comm)
        c.load_state_dict(b.state_dict())
        resumed = [c.aggregate_many(local_grads(comm.rank, s), step=s) for s in (2, 3)]
        return outs[2:], resumed

    for uninterrupted, resumed in ThreadGroup(world).run(worker):
        for u, v in zip(uninterrupted, resumed):
            assert all(torch.equal(u[n], v[n]) for n in SHAPES)


def test_warmup_steps_are_dense():
    results = run(2, 3, lambda comm: LowRank(1, comm=comm, warmup_steps=2))
    for step in range(2):
        for n in SHAPES:
            torch.testing.assert_close(results[0][step][n], dense_mean(2, step)[n], rtol=0, atol=1e-6)
    assert torch.linalg.matrix_rank(results[0][2]["a"]) == 1


def test_built_from_the_config_block():
    uplink, downlink = build(CompressionConfig(compressor="lowrank", rank=4, warmup_steps=3))
    assert isinstance(uplink, LowRank) and downlink is None
    assert uplink.rank == 4 and uplink.warmup_steps == 3
    assert uplink.rank_of("w", (64, 64)) == 4 and uplink.rank_of("bias", (64,)) is None
    assert uplink.rank_of("narrow", (64, 4)) is None  # 4·68 ≥ 256: the factors would not be smaller
    by_fraction = build(CompressionConfig(compressor="lowrank", ratio=0.1))[0]
    assert by_fraction.rank_of("w", (32, 128)) == 3 and by_fraction.rank_of("row", (1, 100)) is None


@pytest.mark.parametrize("overrides, fragment", [
    (["compression.compressor=lowrank", "compression.rank=0"], "compression.rank must be an integer ≥ 1, got 0"),
    (["compression.compressor=lowrank", "compression.rank=-2"], "must be an integer ≥ 1"),
    (["compression.compressor=lowrank", "compression.rank=33"],
     r"rank=33 is larger than matrix blocks.0.attn.q.weight of shape \(32, 32\).*≤ 32"),
    (["compression.compressor=lowrank", "compression.rank=70", "model.vocab_size=300", "model.d_model=64",
      "model.n_heads=2"], r"larger than matrix embed.weight of shape \(300, 64\).*≤ 64"),
    (["compression.compressor=lowrank", "compression.rank=20", "model.vocab_size=16"],
     r"matrix embed.weight of shape \(16, 32\)"),
    (["compression.compressor=lowrank", "compression.ratio=0"], r"must be in \(0, 1\]"),
    (["compression.compressor=lowrank", "compression.estimator=ef21"], "leave compression.estimator unset"),
    (["compression.compressor=lowrank", "compression.downlink=topk", "compression.downlink_ratio=0.1"],
     "no weights are sent back"),
    (["compression.compressor=lowrank", "compression.ef21_eta=0.1"], "does not use"),
    (["compression.compressor=topk", "compression.ratio=0.01", "compression.rank=4"], "applies to compressor lowrank"),
    (["compression.compressor=lowrnk"], "did you mean 'lowrank'"),
])
def test_bad_lowrank_config_is_one_clear_error(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        check_config(load_config(SMOKE, overrides))
    assert "\n" not in str(err.value)

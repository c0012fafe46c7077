"""The block quantisers (compress/quantisers.py): int8 / int4 (`Quantiser`, gathered) and int4_sum
(`SumQuantiser`, codes on shared scales summed in int8): codes worked out by hand, the error bound,
the bytes on the wire, EF14's residual, the overflow bound, and means over threaded ranks."""

from __future__ import annotations

import pytest
import torch

from distlip.compress import EF14, EF21Momentum, Quantiser, SumQuantiser, check, make_compressor
from distlip.compress.accounting import all_gather_bytes, ring_all_reduce_bytes
from distlip.compress.quantisers import QUANT_BLOCK, block_absmax, blocks_of, sum_levels
from distlip.config import CompressionConfig, load_config
from distlip.distributed.env import DistEnv
from distlip.errors import ConfigError
from distlip.preflight import check_distributed

from helpers import ROOT
from helpers.compression import ThreadGroup, aggregate


def roundtrip(q: Quantiser, x: torch.Tensor) -> torch.Tensor:
    return q.decompress(q.compress(x, step=0, tensor_id="x", rank=0), x.numel())


def test_codes_by_hand():
    # absmax 7 at 4 bits (L = 7) and 127 at 8 bits (L = 127): the scale is exactly 1, so the
    # result is x rounded to the nearest integer, halves to even.
    x4 = torch.tensor([7.0, -3.0, 1.4, 0.0, 2.5, -0.6, -6.5])
    assert roundtrip(Quantiser(4), x4).tolist() == [7.0, -3.0, 1.0, 0.0, 2.0, -1.0, -6.0]
    x8 = torch.tensor([127.0, -3.5, 0.6, -126.4])
    assert roundtrip(Quantiser(8), x8).tolist() == [127.0, -4.0, 1.0, -126.0]
    # Each block has its own scale: a second block of absmax 14 at 4 bits has scale 2.
    x = torch.cat([torch.full((QUANT_BLOCK,), 7.0), torch.tensor([14.0, 3.0, -5.0])])
    assert roundtrip(Quantiser(4), x)[QUANT_BLOCK:].tolist() == [14.0, 4.0, -4.0]
    assert not roundtrip(Quantiser(4), torch.zeros(5)).any()  # an all-zero block stays zero


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d", [1, 63, 64, 1000])
def test_error_bound_and_contraction(bits, d):
    q = Quantiser(bits)
    x = torch.randn(d, generator=torch.Generator().manual_seed(d)) ** 3
    err = (roundtrip(q, x) - x).abs()
    absmax = torch.nn.functional.pad(x.abs(), (0, -d % QUANT_BLOCK)).view(-1, QUANT_BLOCK).amax(1)
    bound = (absmax / (2 * q.levels)).repeat_interleave(QUANT_BLOCK)[:d]
    assert (err <= bound * (1 + 1e-5)).all()
    assert err.square().sum() <= (1 - q.delta(d)) * x.square().sum() * (1 + 1e-5)
    assert q.contractive and not q.unbiased and q.delta(d) > 0


@pytest.mark.parametrize("bits, expected", [(8, 4 * 16 + 1000), (4, 4 * 16 + 500)])
def test_bytes_are_values_plus_scales(bits, expected):
    q, d = Quantiser(bits), 1000  # 16 blocks of 64 (the last one short)
    m = q.compress(torch.randn(d), step=0, tensor_id="x", rank=0)
    assert m.values.dtype == torch.uint8 and m.indices is None and not m.whole
    assert q.message_bytes(d, torch.float32) == m.values.nbytes == expected
    assert m.itemsize == 4  # what the dense exchange it replaces would send per coordinate
    assert Quantiser(4).message_bytes(7, torch.float32) == 4 + 4  # an odd count rounds up to whole bytes


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_ef14_residual_is_what_was_left_out(name):
    q = make_compressor(name)
    est = EF14(q, warmup_steps=1)
    gen = torch.Generator().manual_seed(3)
    g0, g1, g2 = (torch.randn(300, generator=gen) for _ in range(3))
    assert torch.equal(aggregate(est, "w", g0, step=0), g0)  # the warm-up round is dense
    assert "e" not in est.state_dict()["w"]
    assert torch.equal(aggregate(est, "w", g1, step=1), roundtrip(q, g1))
    e1 = g1 - roundtrip(q, g1)
    assert torch.equal(est.state_dict()["w"]["e"], e1)
    p = g2 + e1
    assert torch.equal(aggregate(est, "w", g2, step=2), roundtrip(q, p))
    assert torch.equal(est.state_dict()["w"]["e"], p - roundtrip(q, p))
    # Without a warm-up the first round is compressed too: EF14's residual starts at zero.
    fresh = EF14(q)
    assert torch.equal(aggregate(fresh, "w", g0, step=0), roundtrip(q, g0))
    assert torch.equal(fresh.state_dict()["w"]["e"], g0 - roundtrip(q, g0))


@pytest.mark.parametrize("owners", [None, {"a": 1, "b": 0}])
def test_mean_over_ranks_and_bytes(owners):
    world, sizes = 3, {"a": 200, "b": 70}
    grads = {n: torch.randn(world, d, generator=torch.Generator().manual_seed(d)) for n, d in sizes.items()}
    q = Quantiser(8)

    def worker(comm):
        est = EF14(q, comm, warmup_steps=1)
        est.aggregate_many({n: g[comm.rank] for n, g in grads.items()}, step=0, owners=owners)
        est.counter.reset()
        return est.aggregate_many({n: g[comm.rank] for n, g in grads.items()}, step=1, owners=owners), est.counter

    results = ThreadGroup(world).run(worker)
    expected = {n: sum(roundtrip(q, g[r]) for r in range(world)) / world for n, g in grads.items()}
    for rank, (means, counter) in enumerate(results):
        for n, mean in means.items():
            if owners is not None:  # the owner uses its own share whole (exact_own)
                assert owners[n] == rank
                own = grads[n][rank]
                expected[n] = expected[n] + (own - roundtrip(q, own)) / world
            torch.testing.assert_close(mean, expected[n], rtol=0, atol=1e-6)
        if owners is None:  # one all-gather of both payloads; dense would be an all-reduce of fp32
            assert counter.uplink.sent == all_gather_bytes(sum(q.message_bytes(d, torch.float32)
                                                               for d in sizes.values()), world)
            assert counter.dense_bytes == ring_all_reduce_bytes(4 * sum(sizes.values()), world)
            assert torch.equal(means["a"], results[0][0]["a"])  # the same bits on every rank


def test_config():
    assert make_compressor("int4").bits == 4 and make_compressor("int8").levels == 127
    with pytest.raises(ConfigError, match="ratio 1.0"):
        make_compressor("int8", 0.5)
    with pytest.raises(ConfigError, match="downlink=int8"):
        check(CompressionConfig(compressor="topk", ratio=0.1, estimator="ef21", downlink="int8"))
    check(CompressionConfig(compressor="int4", estimator="ef14"))


# ---- int4_sum: codes on shared scales, summed in int8 ------------------------------------------

def test_shared_scale_codes_by_hand():
    # Two blocks whose shared maxima (over the ranks) are 7 and 14: steps 1 and 2 at L = 7. This
    # rank's own values are smaller than the shared maxima, and round on the shared step.
    q = SumQuantiser(2)
    assert q.levels == 7
    x = torch.cat([torch.tensor([3.4, -0.6, 2.5]), torch.zeros(QUANT_BLOCK - 3), torch.tensor([5.0, -3.1])])
    absmax = torch.tensor([7.0, 14.0])
    payload = q.encode(x, absmax)
    assert payload.nbytes == q.message_bytes(x.numel(), torch.float32) == 4 * 2 + x.numel()  # fp32 scales, int8 codes
    codes = payload[8:].view(torch.int8)
    assert codes[:3].tolist() == [3, -1, 2] and codes[QUANT_BLOCK:].tolist() == [2, -2]  # halves to even
    assert q.dequantise(payload, x.numel(), torch.float32)[QUANT_BLOCK:].tolist() == [4.0, -4.0]
    # A block below half the shared step goes as zeros (EF keeps it); no value's error exceeds the value.
    assert not q.encode(torch.full((3,), 0.49), torch.tensor([7.0]))[4:].any() and q.delta(3) == 0.0
    y = torch.randn(500, generator=torch.Generator().manual_seed(0))
    err = q.dequantise(q.encode(y, 3 * block_absmax(y)), 500, torch.float32) - y
    assert (err.abs() <= y.abs()).all()
    # The sum of two ranks' codes decodes on the same scales.
    summed = codes.to(torch.int16) * 2
    assert torch.equal(q.decode_sum(absmax, summed.to(torch.int8), torch.float32),
                       2 * q.dequantise(payload, x.numel(), torch.float32))


def test_levels_keep_the_int8_sum_from_overflowing():
    for world in range(1, 128):
        levels = sum_levels(world)
        assert 1 <= levels <= 7 and world * levels <= 127
        assert levels == 7 or world * (levels + 1) > 127  # the finest that cannot overflow, past 18 ranks
    assert sum_levels(18) == 7 and sum_levels(19) == 6 and sum_levels(127) == 1
    with pytest.raises(ConfigError, match="at most 127 ranks"):
        sum_levels(128)
    assert 19 * 7 > 127  # int4's 7 levels would overflow at 19 ranks: the case below


@pytest.mark.parametrize("world", [18, 19])
def test_extreme_codes_sum_without_overflow(world):
    """Every rank at the block maximum, with the same sign: the largest sums of codes there can be,
    ±M·L (126 at 18 ranks with L = 7; 114 at 19 with L = 6, where int4's 7 would wrap to −123).
    They decode to the mean, which every rank sent exactly."""
    d = 2 * QUANT_BLOCK + 5
    x = 5.0 * torch.where(torch.arange(d) % 3 == 0, -1.0, 1.0)

    def worker(comm):
        return aggregate(EF14(make_compressor("int4_sum", world_size=world), comm), "w", x, step=0)

    for mean in ThreadGroup(world).run(worker):
        torch.testing.assert_close(mean, x, rtol=1e-6, atol=0)


def test_a_quantiser_for_other_ranks_is_refused_in_the_exchange():
    def worker(comm):
        return aggregate(EF14(SumQuantiser(18), comm), "w", torch.ones(4), step=0)

    with pytest.raises(ValueError, match="quantises for 18 ranks, but the exchange has 19"):
        ThreadGroup(19).run(worker)


@pytest.mark.parametrize("owners", [None, {"a": 2, "b": 0}])
def test_summed_codes_give_the_mean_of_each_ranks_codes_and_ef14_keeps_the_rest(owners):
    """Three threaded ranks, three rounds of EF14 (first round compressed): the aggregate is the mean
    of each rank's own codes on the shared scales (the maxima over the ranks of p_m = g_m + e_m), the
    residual is p_m minus its own codes, and the bytes are two all-reduces: fp32 maxima, int8 codes."""
    world, sizes = 3, {"a": 200, "b": 70}
    grads = {n: torch.randn(3, world, d, generator=torch.Generator().manual_seed(d)) for n, d in sizes.items()}
    q = SumQuantiser(world)

    def worker(comm):
        est = EF14(SumQuantiser(world), comm, exact_own=False)
        rounds = []
        for step in range(3):
            est.counter.reset()
            means = est.aggregate_many({n: g[step, comm.rank] for n, g in grads.items()}, step=step, owners=owners)
            rounds.append((means, {n: f["e"].clone() for n, f in est.state_dict().items()}, est.counter.uplink.sent))
        return rounds, comm.log

    results = ThreadGroup(world).run(worker)
    e = {n: torch.zeros(world, d) for n, d in sizes.items()}
    for step in range(3):
        for n, d in sizes.items():
            p = grads[n][step] + e[n]
            top = torch.stack([block_absmax(p[m]) for m in range(world)]).amax(0)
            sent = torch.stack([q.dequantise(q.encode(p[m], top), d, torch.float32) for m in range(world)])
            for rank, (rounds, _) in enumerate(results):
                means, residual, nbytes = rounds[step]
                assert torch.equal(residual[n], p[rank] - sent[rank])  # EF14: what its own codes left out
                if owners is None or owners[n] == rank:
                    torch.testing.assert_close(means[n], sent.mean(0), rtol=0, atol=1e-6)
                else:
                    assert n not in means
                scales = ring_all_reduce_bytes(4 * sum(blocks_of(d) for d in sizes.values()), world)
                assert nbytes == scales + ring_all_reduce_bytes(sum(sizes.values()), world)
            e[n] = p - sent
    assert results[0][1][:2] == ["all_reduce_max", "all_reduce_sum"]  # every tensor in one pair of all-reduces
    assert len(results[0][1]) == 6
    if owners is None:
        assert all(torch.equal(r[0][2][0]["a"], results[0][0][2][0]["a"]) for r in results)  # same bits everywhere


def test_ef21_and_owners_own_share_on_shared_scales():
    """EF21 with the owner's own share whole (exact_own): u_m follows what was sent, and the owner's
    aggregate is the published one with its own message exact, as for the other compressors."""
    world, d = 2, 130
    grads = torch.randn(2, world, d, generator=torch.Generator().manual_seed(5))
    q = SumQuantiser(world)

    def worker(comm):
        est = EF21Momentum(SumQuantiser(world), comm, warmup_steps=1)
        return [est.aggregate_many({"w": grads[s, comm.rank]}, step=s, owners={"w": 0}) for s in range(2)], \
            est.state_dict()["w"]["u"].clone()

    (owner, _), (other, u1) = ThreadGroup(world).run(worker)
    assert other == [{}, {}]
    x = grads[1] - grads[0]  # v − u after the dense round, per rank
    top = torch.stack([block_absmax(x[m]) for m in range(world)]).amax(0)
    sent1 = q.dequantise(q.encode(x[1], top), d, torch.float32)
    torch.testing.assert_close(u1, grads[0, 1] + sent1, rtol=0, atol=1e-6)
    torch.testing.assert_close(owner[1]["w"], (grads[1, 0] + grads[0, 1] + sent1) / 2, rtol=0, atol=1e-6)


def test_int4_sum_config():
    assert make_compressor("int4_sum", world_size=8).levels == 7
    assert make_compressor("int4_sum", world_size=32).levels == 3
    with pytest.raises(ConfigError, match="ratio 1.0"):
        make_compressor("int4_sum", 0.5)
    with pytest.raises(ConfigError, match="downlink=int4_sum"):
        check(CompressionConfig(compressor="topk", ratio=0.1, estimator="ef21", downlink="int4_sum"))
    with pytest.raises(ConfigError, match="needs an unbiased compressor"):
        check(CompressionConfig(compressor="int4_sum", estimator="diana"))
    check(CompressionConfig(compressor="int4_sum", estimator="ef14", sync_every=16))
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["compression.compressor=int4_sum", "compression.estimator=ef14",
                                                        "train.batch_size=16256"])  # 127 · 128
    check_distributed(cfg, DistEnv(rank=0, world_size=127))
    with pytest.raises(ConfigError, match="^compression: compressor int4_sum .* but there are 128 ranks") as err:
        check_distributed(cfg, DistEnv(rank=0, world_size=128))
    assert "\n" not in str(err.value)

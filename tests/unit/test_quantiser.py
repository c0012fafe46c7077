"""The int8 / int4 block quantisers (compress/compressors.py `Quantiser`): codes worked out by
hand, the error bound, the bytes on the wire, EF14's residual, and means over threaded ranks."""

from __future__ import annotations

import pytest
import torch

from distlip.compress import EF14, Quantiser, check, make_compressor
from distlip.compress.accounting import all_gather_bytes, ring_all_reduce_bytes
from distlip.compress.compressors import QUANT_BLOCK
from distlip.config import CompressionConfig
from distlip.errors import ConfigError

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
    est = EF14(q)
    gen = torch.Generator().manual_seed(3)
    g0, g1, g2 = (torch.randn(300, generator=gen) for _ in range(3))
    assert torch.equal(aggregate(est, "w", g0, step=0), g0)  # the first round is dense
    assert "e" not in est.state_dict()["w"]
    assert torch.equal(aggregate(est, "w", g1, step=1), roundtrip(q, g1))
    e1 = g1 - roundtrip(q, g1)
    assert torch.equal(est.state_dict()["w"]["e"], e1)
    p = g2 + e1
    assert torch.equal(aggregate(est, "w", g2, step=2), roundtrip(q, p))
    assert torch.equal(est.state_dict()["w"]["e"], p - roundtrip(q, p))


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

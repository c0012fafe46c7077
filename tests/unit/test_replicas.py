"""The replicas' start-up fingerprint (`distlip.distributed.replicas.fingerprint`): equal bits give
equal fingerprints, and a one-ulp change anywhere, or two elements swapped, changes them."""

import pytest
import torch

from distlip.distributed.replicas import fingerprint


def ulp_up(t: torch.Tensor, i: int) -> torch.Tensor:
    out = t.clone()
    flat = out.view(-1)
    flat[i] = torch.nextafter(flat[i], torch.tensor(float("inf"), dtype=flat.dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equal_bits_agree_and_one_ulp_anywhere_differs(dtype):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(70_001, generator=g).to(dtype)  # three chunks of 2**15, the last partial
    small = torch.randn(3, 4, generator=g).to(dtype)
    base = fingerprint([big, small])
    assert base.shape == (4,) and base.dtype == torch.int64
    assert torch.equal(fingerprint([big.clone(), small.clone()]), base)
    for i in (0, 2**15 - 1, 2**15, 70_000):
        changed = fingerprint([ulp_up(big, i), small])
        assert not torch.equal(changed[:2], base[:2]), i
        assert torch.equal(changed[2:], base[2:])
    assert not torch.equal(fingerprint([big, ulp_up(small, 11)])[2:], base[2:])


def test_swapped_elements_differ_and_signs_count():
    t = torch.tensor([1.0, 2.0, -3.0, 0.0])
    assert not torch.equal(fingerprint([t[[1, 0, 2, 3]]]), fingerprint([t]))
    assert not torch.equal(fingerprint([torch.tensor([-0.0])]), fingerprint([torch.tensor([0.0])]))

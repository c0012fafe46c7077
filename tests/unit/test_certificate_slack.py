"""The sharper per-layer quantities `benchmarks/certificate_slack.py` measures: each is a sound
replacement for a product of norms (≤ 1 of it), reaches 1 when the weights are aligned, and the
rotary maps it uses are the model's."""

import math
import sys

import torch

from distlip.model import Rotary

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from certificate_slack import mlp_ratio, qk_ratio, rotations, vocab_ratio  # noqa: E402


def test_rotations_are_the_models_rotary_at_relative_offsets():
    d_head, T = 8, 6
    rot = Rotary(d_head, 0.5, 100.0, T)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(T, d_head, generator=gen), torch.randn(T, d_head, generator=gen)
    qr, kr = rot(q[None, None])[0, 0].double(), rot(k[None, None])[0, 0].double()
    R = rotations(d_head, 0.5, 100.0, -torch.arange(T))
    for t in range(T):
        for j in range(t + 1):
            # q_t·k_j after rotary = q_tᵀ R_{j−t} k_j
            assert math.isclose(qr[t] @ kr[j], q[t].double() @ R[t - j] @ k[j].double(), rel_tol=1e-5, abs_tol=1e-5)


def test_qk_ratio_is_at_most_one_and_one_for_aligned_blocks():
    gen = torch.Generator().manual_seed(1)
    R = rotations(4, 1.0, 10.0, -torch.arange(5))
    for _ in range(5):
        wq, wk = torch.randn(4, 12, generator=gen), torch.randn(4, 12, generator=gen)
        assert qk_ratio(wq, wk, R) <= 1 + 1e-12
    wq = torch.randn(4, 12, generator=gen)
    assert math.isclose(qk_ratio(wq, wq, R), 1.0, rel_tol=1e-9)  # Δ = 0: R = I and σ₁(WᵀW) = σ₁²


def test_mlp_ratio_is_one_when_aligned_and_zero_when_out_reads_other_units():
    gen = torch.Generator().manual_seed(2)
    w_in = torch.randn(16, 4, generator=gen)
    assert math.isclose(mlp_ratio(w_in, w_in.T), 1.0, rel_tol=1e-9)
    w_in[8:] = 0  # units 8… never fire; an output layer that reads only them sees nothing
    w_out = torch.zeros(4, 16)
    w_out[:, 8:] = torch.randn(4, 8, generator=gen)
    assert mlp_ratio(w_in, w_out) == 0.0


def test_vocab_ratio_is_one_on_the_top_direction_and_less_off_it():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 8, generator=gen)
    top = torch.linalg.svd(w.double()).Vh[0]
    top = top / top.pow(2).mean().sqrt()  # token RMS 1
    off = torch.linalg.svd(w.double()).Vh[-1]  # a direction W maps to 0 (rank 4 < 8)
    off = off / off.pow(2).mean().sqrt()
    assert math.isclose(vocab_ratio(w, torch.stack([top, off])), 1.0, rel_tol=1e-9)
    assert vocab_ratio(w, torch.stack([off, 0.5 * top])) < 0.5 + 1e-9

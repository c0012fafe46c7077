"""The local-step outer loop (compression.sync_every > 1) in one process: its outer Nesterov step
against torch's SGD and a hand computation, error feedback on the pseudo-gradient against a hand
computation (ranks as threads), H = 1 with dense pseudo-gradients, outer lr 1 and momentum 0 against
per-step training, and its state round trip."""

import copy

import pytest
import torch

from distlip.compress import SingleProcessComm, make_compressor
from distlip.compress.accounting import ring_all_reduce_bytes
from distlip.compress.quantisers import block_absmax
from distlip.config import load_config
from distlip.config.schema import CompressionConfig
from distlip.distributed.env import DistEnv
from distlip.distributed.outer import OuterLoop
from distlip.errors import ConfigError
from distlip.lipschitz.caps import matrix_caps
from distlip.lipschitz.constrainer import Constrainer
from distlip.model import LipschitzTransformer, matrix_names
from distlip.optim import Optimizers, nesterov_outer_update
from distlip.preflight import check_config, check_distributed

from helpers.compression import ThreadGroup

SMOKE = "configs/smoke.yaml"


def test_outer_step_is_torch_sgd_nesterov_and_the_hand_computation():
    x, b = torch.tensor([1.0]), torch.zeros(1)
    nesterov_outer_update(x, torch.tensor([0.5]), b, lr=0.7, momentum=0.9)
    # b = 0.5; x = 1 − 0.7·(0.5 + 0.9·0.5) = 0.335
    assert b.item() == pytest.approx(0.5) and x.item() == pytest.approx(0.335)
    nesterov_outer_update(x, torch.tensor([0.2]), b, lr=0.7, momentum=0.9)
    # b = 0.9·0.5 + 0.2 = 0.65; x = 0.335 − 0.7·(0.2 + 0.9·0.65) = −0.2145
    assert b.item() == pytest.approx(0.65) and x.item() == pytest.approx(-0.2145)

    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    mine, buf = p.detach().clone(), torch.zeros(5, 3)
    for _ in range(4):
        g = torch.randn(5, 3, generator=gen)
        p.grad = g.clone()
        sgd.step()
        nesterov_outer_update(mine, g, buf, lr=0.7, momentum=0.9)
        assert torch.allclose(mine, p.detach(), rtol=1e-6, atol=1e-7)


def outer(section: CompressionConfig, params: dict, comm, *, total: int = 100, constrain=lambda x: None) -> OuterLoop:
    return OuterLoop(section, params, list(params), list(params), total=total, constrain=constrain, comm=comm)


def test_rounds_end_every_h_steps_and_at_the_last():
    loop = outer(CompressionConfig(sync_every=4), {"w": torch.nn.Parameter(torch.zeros(3))}, SingleProcessComm(),
                 total=10)
    assert [s for s in range(10) if loop.ends_round(s)] == [3, 7, 9]


@pytest.mark.parametrize("name, ratio", [("topk", 0.25), ("int4", 1.0), ("int4_sum", 1.0)])
def test_error_feedback_residual_on_the_pseudo_gradient_is_the_hand_computation(name, ratio):
    """Two ranks (threads), Top-k 25%, int4 or int4_sum (on the ranks' shared block maxima) with EF14,
    warm-up 0. Every round, the first included (EF14's residual starts at zero), each rank sends
    C(Δ_m + e_m) and keeps e_m ← Δ_m + e_m − C(Δ_m + e_m); the ranks all step x with the mean of
    what was sent. Every round moves the same bytes, fewer than a dense all-reduce."""
    section = CompressionConfig(compressor=name, ratio=ratio, estimator="ef14", warmup_steps=0,
                                sync_every=2, outer_lr=0.7, outer_momentum=0.9)
    d, compressor = 8, make_compressor(name, ratio)
    gen = torch.Generator().manual_seed(1)
    moves = torch.randn(3, 2, d, generator=gen)  # round r, rank m: how far the local steps move w

    def worker(comm):
        w = torch.nn.Parameter(torch.zeros(d))
        loop = outer(section, {"w": w}, comm)
        seen = []
        for r in range(3):
            x = loop.global_weights["w"].clone()
            w.data.copy_(x + moves[r, comm.rank])  # what H local steps would leave
            loop.gradients(lambda n: torch.zeros(d), 2 * r)
            loop.share(2 * r)
            assert not loop.ends_round(2 * r)
            loop.gradients(lambda n: torch.zeros(d), 2 * r + 1)
            loop.share(2 * r + 1)  # the round's end: the exchange
            e = loop.uplink.state_dict()["w"].get("e")
            seen.append((x, loop.global_weights["w"].clone(), w.data.clone(), None if e is None else e.clone(),
                         loop.counter.uplink.sent))
        return seen

    ranks = ThreadGroup(2).run(worker)
    x, b, e = torch.zeros(d), torch.zeros(d), [torch.zeros(d), torch.zeros(d)]
    for r in range(3):
        delta = [-moves[r, m] for m in range(2)]  # Δ_m = x − w_m
        p = [delta[m] + e[m] for m in range(2)]
        if name == "int4_sum":
            top = torch.maximum(block_absmax(p[0]), block_absmax(p[1]))
            sent = [compressor.dequantise(compressor.encode(p[m], top), d, torch.float32) for m in range(2)]
        else:
            sent = [compressor.decompress(compressor.compress(p[m], step=2 * r + 1, tensor_id="w", rank=m), d)
                    for m in range(2)]
        e = [p[m] - sent[m] for m in range(2)]
        mean = (sent[0] + sent[1]) / 2
        b = 0.9 * b + mean
        x = x - 0.7 * (mean + 0.9 * b)
        for m, rank in enumerate(ranks):
            start, new_x, local, residual, nbytes = rank[r]
            assert nbytes == (r + 1) * rank[0][4] < (r + 1) * ring_all_reduce_bytes(4 * d, 2)
            assert torch.allclose(new_x, x, atol=1e-6)
            assert torch.equal(local, new_x)  # every rank starts the next round from x
            assert torch.allclose(residual, e[m], atol=1e-6), (r, m)
            if name == "topk":
                assert int((residual != 0).sum()) == d - 2  # what Top-k 2 of 8 left behind
    assert torch.equal(ranks[0][2][1], ranks[1][2][1])  # the same x on both ranks, bit for bit


def test_outer_step_result_is_constrained_and_every_rank_starts_from_it():
    calls = []

    def halve(weights):
        calls.append(True)
        for w in weights.values():
            w.mul_(0.5)

    w = torch.nn.Parameter(torch.ones(4))
    loop = outer(CompressionConfig(sync_every=2), {"w": w}, SingleProcessComm(), constrain=halve)
    w.data.fill_(3.0)
    loop.share(0)
    assert not calls and torch.equal(w.data, torch.full((4,), 3.0))  # mid-round: nothing happens
    loop.share(1)
    # Δ = 1 − 3 = −2, b = −2, x = 1 − 0.7·(−2 − 1.8) = 3.66, halved: 1.83
    assert calls and torch.allclose(w.data, torch.full((4,), 1.83)) and torch.equal(w.data, loop.global_weights["w"])


# ---- H = 1, dense, outer lr 1, momentum 0: per-step training --------------------------------------

STEPS = 6


def tiny():
    cfg = load_config(SMOKE, ["model.vocab_size=32", "model.d_model=16", "model.n_heads=2", "model.context=16",
                              "constraint.sigma_max=1.2",
                              "constraint.method=spectral_normalize", "optim.lr=0.2"])
    torch.manual_seed(0)
    return cfg, LipschitzTransformer(cfg.model)


def batches(vocab: int, rank: int = 0):
    gen = torch.Generator().manual_seed(7)  # the same tokens on every rank
    return [torch.randint(0, vocab, (4, 17), generator=gen) for _ in range(STEPS)]


def train(cfg, model, comm=None):
    """STEPS steps of Muon + the constraint on `model`, as the engine's step orders them; through a
    H = 1 outer loop with dense pseudo-gradients, outer lr 1 and momentum 0 when `comm` is given."""
    params = dict(model.named_parameters())
    mats = matrix_names(model)
    caps = matrix_caps(cfg.constraint, mats)
    optim = Optimizers(params, cfg.optim, n_layers=cfg.model.n_layers)
    local = Constrainer(cfg.constraint.method, caps)
    outer_caps = Constrainer(cfg.constraint.method, caps)

    def constrain_global(weights):
        for n, w in outer_caps.apply_many({n: weights[n] for n in mats}, lr=0.0).items():
            weights[n].copy_(w)

    loop = None
    if comm is not None:
        section = CompressionConfig(sync_every=1, outer_lr=1.0, outer_momentum=0.0)
        loop = OuterLoop(section, params, list(params), list(params), total=STEPS, constrain=constrain_global,
                         comm=comm)
    for step, tokens in enumerate(batches(cfg.model.vocab_size)):
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads = {n: p.grad.float() for n, p in params.items()}
        if loop is not None:
            grads = loop.gradients(lambda n: params[n].grad.float(), step)
        info = optim.step(step, STEPS, grads)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, w in local.apply_many({n: params[n].data for n in mats}, lr=info.lr,
                                         update_norms={n: info.update_norms[n] * 1.05 for n in mats}).items():
                params[n].data.copy_(w)
        if loop is not None:
            loop.share(step)
    return {n: p.detach().clone() for n, p in params.items()}


def test_h1_dense_outer_lr1_momentum0_is_per_step_training():
    """To fp32 rounding, not bit for bit: x − (x − w) is not w in floating point, and the outer
    constraint's normalisation of an already capped matrix divides by 1 + O(1e-7). Shown on one
    process and on two (threads) that see the same tokens: with different tokens per rank H = 1 is
    not per-step training, since Muon's orthogonalised step is nonlinear in the gradient."""
    cfg, model = tiny()
    reference = train(cfg, copy.deepcopy(model))
    assert any(not torch.equal(reference[n], p) for n, p in model.named_parameters())  # it trained
    one = train(cfg, copy.deepcopy(model), SingleProcessComm())
    two = ThreadGroup(2).run(lambda comm: train(cfg, copy.deepcopy(model), comm))
    for got in (one, *two):
        for n, w in reference.items():
            assert torch.allclose(got[n], w, rtol=1e-5, atol=1e-6), n
    for n in reference:
        assert torch.equal(two[0][n], two[1][n])


def test_state_round_trip_resumes_mid_round():
    section = CompressionConfig(compressor="topk", ratio=0.25, estimator="ef14", warmup_steps=0, sync_every=3)
    gen = torch.Generator().manual_seed(3)
    moves = torch.randn(12, 8, generator=gen)

    def run(loop, w, steps):
        for s in steps:
            w.data.add_(moves[s])
            loop.share(s)

    w = torch.nn.Parameter(torch.zeros(8))
    straight = outer(section, {"w": w}, SingleProcessComm())
    run(straight, w, range(7))
    state = copy.deepcopy(straight.state_dict())
    assert set(state["w"]) >= {"master", "local", "outer_momentum", "e"}
    run(straight, w, range(7, 12))
    w2 = torch.nn.Parameter(torch.full((8,), 9.0))
    resumed = outer(section, {"w": w2}, SingleProcessComm())
    resumed.load_state_dict(state)
    run(resumed, w2, range(7, 12))
    assert torch.equal(w2.data, w.data) and torch.equal(resumed.global_weights["w"], straight.global_weights["w"])


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    (["compression.sync_every=0"], r"compression.sync_every=0 must be an integer ≥ 1"),
    (["compression.sync_every=4", "optim.embed=adam"], "set optim.embed=colnorm and dist.zero_stage=0"),
    (["compression.sync_every=4", "optim.embed=adam", "dist.zero_stage=2"], "DeepSpeed .dist.zero_stage=2."),
    (["compression.sync_every=4", "compression.compressor=topk", "compression.ratio=0.1", "compression.downlink=topk",
      "compression.downlink_ratio=0.1"], "the outer loop sends none"),
    (["compression.sync_every=4", "compression.compressor=randk", "compression.ratio=0.1",
      "compression.estimator=marina"], "marina takes a second backward pass"),
    (["compression.sync_every=4", "compression.compressor=topk", "compression.ratio=0.1", "compression.ef21_eta=0.1"],
     "set compression.ef21_eta=1.0"),
    (["compression.sync_every=4", "compression.outer_lr=0"], "outer_lr=0.0 must be > 0"),
    (["compression.sync_every=4", "compression.outer_momentum=1.0"], r"outer_momentum=1.0 must be in \[0, 1\)"),
    (["compression.sync_every=4", "optim.name=adamw"], "use optim.name=muon"),
])
def test_outer_loop_options_it_cannot_honour_are_one_clear_line(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        check_config(load_config(SMOKE, overrides))
    assert "\n" not in str(err.value)


def test_outer_loop_needs_two_processes():
    cfg = load_config(SMOKE, ["compression.sync_every=4"])
    with pytest.raises(ConfigError, match=r"compression.sync_every=4 needs ≥ 2 processes"):
        check_distributed(cfg, DistEnv())
    check_distributed(cfg, DistEnv(rank=0, world_size=2))

"""Compressed communication in real 2-process training (gloo), on a tiny model: ratio 1.0 is dense
training bit for bit (low rank at full rank too), the certificate holds on the masters at every
step when both directions are compressed, low rank keeps the ranks identical and capped, the
compression state resumes exactly, and MARINA's second pass leaves DeepSpeed's embedding alone.
These fail on bugs, not on noise; the Shakespeare convergence comparisons are in tests/convergence/.

One torchrun launch runs everything (tests/helpers/compress_worker.py); the tests compare its records.
"""

import pytest
import torch

from helpers import compress_worker as worker
from helpers.distlaunch import run_worker

CAP = 1.2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_worker("compress_worker.py", tmp_path_factory.mktemp("compress"))


@pytest.mark.parametrize("name", sorted(worker.RATIO_ONE))
def test_ratio_one_reproduces_dense_training_bit_for_bit(ranks, name):
    reference = name.split("/")[0] + "/off" if "/" in name else "off"
    for rank in ranks:
        got, ref = rank["ratio_one"][name], rank["ratio_one"][reference]
        assert got["losses"] == ref["losses"]
        for step, (w, w_ref) in enumerate(zip(got["weights"], ref["weights"])):
            for n in w_ref:
                assert torch.equal(w[n], w_ref[n]), f"{name}: {n} differs after step {step}"


def test_bytes_are_counted_per_step(ranks):
    dense, topk = ranks[0]["ratio_one"]["dense"]["bytes"], ranks[0]["certified"]["topk5%+ef21+downlink5%"]["bytes"]
    assert ranks[0]["ratio_one"]["off"]["bytes"][0] == {}  # compression off: nothing to report
    assert dense[-1]["uplink_bytes"] == dense[-1]["uplink_dense_sent"] > 0
    assert dense[-1]["compression_ratio"] == 1.0
    first, later = topk[0], topk[-1]  # step 0 is the dense warm-up
    assert first["uplink_bytes"] == first["uplink_dense_sent"]
    assert later["uplink_bytes"] < later["uplink_dense_sent"] / 5
    assert later["downlink_bytes"] < later["downlink_dense_received"] / 5
    assert later["compression_ratio"] > 5 and later["uplink_ratio"] > 5
    assert later["uplink_bytes_total"] > later["uplink_bytes"] * (worker.TINY_STEPS - 1)


@pytest.mark.parametrize("name", sorted(worker.CERTIFIED))
def test_masters_certified_at_every_step_under_both_way_compression(ranks, name):
    a, b = ranks[0]["certified"][name], ranks[1]["certified"][name]
    for norms in a["master_norms"]:
        assert max(norms.values()) <= CAP * (1 + 1e-4), norms
    assert a["certificate"] <= 1 + 1e-4
    assert max(a["master_minus_forward"][1:]) > 0  # the downlink really sends less than x
    assert a["master_norms"] == b["master_norms"]  # every rank sees the same masters
    for w_a, w_b in zip(a["weights"], b["weights"]):  # and the same forward weights, bit for bit
        assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)


@pytest.mark.parametrize("name", sorted(worker.LOWRANK))
def test_lowrank_steps_every_rank_alike_within_its_caps(ranks, name):
    """No owner and no downlink: both ranks step every matrix from the same all-reduced aggregate,
    so their weights agree bit for bit after every step, and stay within their caps."""
    a, b = ranks[0]["lowrank"][name], ranks[1]["lowrank"][name]
    for w_a, w_b in zip(a["weights"], b["weights"]):
        assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)
    assert a["master_minus_forward"] == [0.0] * worker.TINY_STEPS  # no masters apart: w is x
    for norms in a["master_norms"]:
        assert max(norms.values()) <= CAP * (1 + 1e-4), norms
    later = a["bytes"][-1]
    assert later["downlink_bytes"] == 0 and 0 < later["uplink_bytes"] < later["uplink_dense_sent"] / 3
    assert a["losses"] != ranks[0]["ratio_one"]["off"]["losses"]  # rank 2 of 16-wide matrices is not dense


@pytest.mark.parametrize("name", sorted(worker.RESUMED))
def test_compression_state_resumes_exactly(ranks, name):
    for rank in ranks:
        case = rank["resume"][name]
        assert "head.weight" in case["state_names"] and "embed.weight" in case["state_names"]
        for n, w in case["straight"].items():
            assert torch.equal(case["resumed"][n], w), n


def test_marinas_second_pass_leaves_the_deepspeed_embedding_alone(ranks):
    """ZeRO-1 with DeepSpeed's Adam on the embedding: the second backward pass runs at step 1
    (the first compressed step). Had it added to DeepSpeed's gradient, the embedding after step 1
    would differ from DIANA's run, which took the same dense step 0 and one ordinary pass."""
    marina, diana = ranks[0]["zero1_marina"]["marina"], ranks[0]["zero1_marina"]["diana"]
    assert torch.equal(marina["weights"][1]["embed.weight"], diana["weights"][1]["embed.weight"])
    after = marina["weights"][1], diana["weights"][1]
    assert any(not torch.equal(after[0][n], after[1][n]) for n in after[0])  # the matrices' estimates differ
    for rank in ranks:  # and the ranks stay identical
        for w_a, w_b in zip(rank["zero1_marina"]["marina"]["weights"], ranks[0]["zero1_marina"]["marina"]["weights"]):
            assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)

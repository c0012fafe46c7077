"""The local-step outer loop (compression.sync_every = 3) in real 2-process training (gloo, CPU, fp32) on a
tiny model: the ranks' weights part between exchanges and meet at every round's end, every model that
exists (each rank's local one after every step, the global one after every outer step) is within its
caps by exact SVD, the pseudo-gradient bytes are counted once per round, and a run resumed from a
checkpoint written mid-round gives the uninterrupted run's losses and weights bit for bit.

One torchrun launch runs everything (tests/helpers/outer_worker.py); the tests compare its records.
"""

import pytest
import torch

from helpers import outer_worker as worker
from helpers.distlaunch import run_worker

CAP = 1.2
ROUND_ENDS = [s for s in range(worker.STEPS) if (s + 1) % worker.H == 0]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_worker("outer_worker.py", tmp_path_factory.mktemp("outer"))


@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_ranks_step_alone_and_meet_at_every_round_end(ranks, name):
    a, b = ranks[0]["runs"][name], ranks[1]["runs"][name]
    for step, (w_a, w_b) in enumerate(zip(a["weights"], b["weights"])):
        same = all(torch.equal(w_a[n], w_b[n]) for n in w_a)
        assert same == (step in ROUND_ENDS), step  # local steps on different batches part the ranks
    for rank in ranks:  # what is exported: the last round's global weights, which every rank holds
        for n, x in rank["runs"][name]["masters"].items():
            assert torch.equal(x, a["weights"][-1][n]), n
    assert a["losses"] == b["losses"]  # the mean over ranks, on both


@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_every_local_and_global_model_is_within_its_caps(ranks, name):
    for rank in ranks:
        record = rank["runs"][name]
        for step, norms in enumerate(record["norms"]):
            assert max(norms.values()) <= CAP * (1 + 1e-4), (step, norms)
        assert record["final_certified"]
    # The trainer's certificate (exact, per head block too) covers both ranks: at least the larger
    # rank's whole-matrix ratio, at most 1, the same on both.
    a, b = ranks[0]["runs"][name], ranks[1]["runs"][name]
    for step, cert in enumerate(a["certificate"]):
        largest = max(max(a["norms"][step].values()), max(b["norms"][step].values())) / CAP
        assert largest * (1 - 1e-6) <= cert <= 1 + 1e-4, step
        assert cert == b["certificate"][step]


def test_pseudo_gradient_bytes_are_counted_once_per_round(ranks):
    dense, topk = ranks[0]["runs"]["dense"], ranks[0]["runs"]["topk+ef14"]
    full = 4 * dense["distlip_params"]  # fp32 pseudo-gradients of every distlip-held tensor
    for step, fields in enumerate(dense["bytes"]):
        # one ring all-reduce on 2 ranks sends (and receives) the whole message once; nothing in between
        assert fields["uplink_bytes"] == (full if step in ROUND_ENDS else 0.0), step
        assert fields["downlink_bytes"] == 0.0 and fields["outer_rounds"] == int(step in ROUND_ENDS)
    assert dense["bytes"][-1]["uplink_bytes_total"] == len(ROUND_ENDS) * full
    first, later = topk["bytes"][ROUND_ENDS[0]], topk["bytes"][ROUND_ENDS[-1]]
    assert first["uplink_bytes"] == later["uplink_bytes"]  # EF14's first round is compressed too (warm-up 0)
    assert later["uplink_bytes"] < full / 4 and later["compression_ratio"] > 4  # Top-k 10%: values + int32 indices


@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_resumed_mid_round_gives_the_uninterrupted_losses_and_weights(ranks, name):
    assert worker.SAVE_AT % worker.H != 0  # the checkpoint is inside a round
    for rank in ranks:
        case = rank["resume"][name]
        assert case["resumed"] == case["straight"]  # bit for bit
        for n, w in case["straight_weights"].items():
            assert torch.equal(case["resumed_weights"][n], w), n

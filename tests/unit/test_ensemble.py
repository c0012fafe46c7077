"""Certified ensembles: `distlip ensemble`, its certificate (Σ weight × member bound) against an
attack on pairs of soft token sequences, its validation figures against the members' own logits,
and the inputs it refuses."""

import json
import math
from dataclasses import replace

import pytest
import torch
from test_robustness import cap_weights
from test_robustness_cli import TEXT

from distlip.checkpoint.export import save_model
from distlip.checkpoint.state import open_model
from distlip.cli import main
from distlip.config import load_config
from distlip.data.in_memory import load_char_corpus, val_windows
from distlip.ensemble import Ensemble, load_ensemble, open_members
from distlip.lipschitz.attack import max_rms, token_pair_attack
from distlip.lipschitz.certificate import certify_weights, weighted_bound
from distlip.model import LipschitzTransformer
from distlip.robustness_report import validation_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def export_member(tmp_path, name: str, seed: int, *, cap: float = 1.0, tau: float = 1.0, text: str = TEXT,
                  method: str = "exact_cap", context: int = 16):
    """A random 1×16 model, every matrix capped at `cap` by SVD, exported with its config."""
    path = tmp_path / f"{name}.txt"
    path.write_text(text)
    over = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", f"model.context={context}", "data.source=text",
            f"data.path={path}", f"constraint.method={method}", f"constraint.sigma_max={cap}",
            f"train.loss_temperature={tau}"]
    if method == "none":
        over.append("constraint.embed_cap=false")
    cfg = load_config(None, over)
    tok, _, _ = load_char_corpus("text", str(path), cfg.data.val_fraction)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=tok.vocab_size))
    torch.manual_seed(seed)
    model = LipschitzTransformer(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        cap_weights(model, cap)
    out = tmp_path / name
    save_model(out, dict(model.named_parameters()), cfg, tok)
    return out


def members(tmp_path, taus=(1.0, 3.0)):
    return [str(export_member(tmp_path, f"m{i}", seed=i, tau=t)) for i, t in enumerate(taus)]


def test_weighted_bound_is_the_weighted_sum_of_member_bounds():
    assert weighted_bound([0.25, 0.75], [4.0, 8.0]) == pytest.approx(7.0)
    assert weighted_bound([-0.5, 0.5], [2.0, 2.0]) == pytest.approx(2.0)  # |w|: a difference is no smaller
    with pytest.raises(ValueError):
        weighted_bound([1.0], [1.0, 2.0])


def test_the_ensemble_command_certifies_weights_by_temperature_and_evaluates_the_mean_logits(tmp_path, capsys):
    paths = members(tmp_path)
    out = tmp_path / "ens"
    assert main(["ensemble", *paths, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "ensemble.json").read_text())
    assert meta["weights"] == pytest.approx([0.25, 0.75]) and meta["temperature"] == pytest.approx(2.0)
    # the certificate: Σ w_i × each member's own exact certificate
    bounds = []
    for p in paths:
        model, cfg, tok, _ = open_model(p)
        bounds.append(certify_weights(dict(model.named_parameters()), cfg)[0].bound)
    assert meta["certificate"]["lipschitz_bound"] == pytest.approx(0.25 * bounds[0] + 0.75 * bounds[1], rel=1e-12)
    assert f"lipschitz_bound: {meta['certificate']['lipschitz_bound']:.6g}" in printed
    # validation: the members' logits mixed by hand, on the whole split
    ens, _ = load_ensemble(out)
    first = ens.members[0]
    x, y = val_windows(validation_ids(first.cfg, first.tokenizer), first.cfg.seq_len())
    with torch.no_grad():
        z = 0.25 * ens.members[0].model(x) + 0.75 * ens.members[1].model(x)
        single = ens.members[0].model(x)
    acc = (z.argmax(-1) == y).float().mean().item()
    loss = torch.nn.functional.cross_entropy(2.0 * z.flatten(0, 1), y.flatten()).item()
    assert meta["validation"]["val_acc"] == pytest.approx(acc, abs=1e-9)
    assert meta["validation"]["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert (single.argmax(-1) == z.argmax(-1)).float().mean() < 1  # the mix is not just one member
    # `distlip certify` recomputes the certificate from the copied members and prints it
    assert main(["certify", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ensemble of 2 models" in text and f"{meta['certificate']['lipschitz_bound']:.6g}" in text
    assert f"val_acc {acc:.2%}" in text


@pytest.mark.parametrize("cap", [0.5, 1.0, 2.0])
def test_the_attack_on_soft_token_pairs_never_beats_the_certificate(tmp_path, cap):
    """Members capped tightly (0.5) to loosely (2); the attack ascends pairs of soft token
    sequences, where the token-id certificate holds. It must find no ratio above the bound of
    the ensemble or of either member alone, and at least what a pair of plain token sequences
    differing in one token gives (an attack that finds less is not searching)."""
    paths = [str(export_member(tmp_path, f"c{i}", seed=10 + i, cap=cap, tau=1.0 + 2 * i)) for i in range(2)]
    ens = Ensemble(open_members(paths)).double()
    V = ens.members[0].cfg.model.vocab_size
    tokens = torch.randint(V, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        flipped = tokens.clone()
        flipped[:, 3] = (flipped[:, 3] + 1) % V
        plain = (max_rms(ens(tokens) - ens(flipped)) / 2).max().item()
    found = token_pair_attack(ens.soft_logits, tokens, V, steps=40, restarts=4, seed=0)
    assert plain <= found * (1 + 1e-9)
    assert found <= ens.bound * (1 + 1e-9), f"ratio {found} above the ensemble's bound {ens.bound}"
    for m in ens.members:
        alone = token_pair_attack(lambda p, m=m: m.model.logits_from_embeddings(p @ m.model.embed.weight),
                                  tokens, V, steps=40, restarts=2, seed=1)
        assert alone <= m.bound * (1 + 1e-9), f"ratio {alone} above the member's bound {m.bound}"


def test_certify_probe_on_an_ensemble(tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(["ensemble", *members(tmp_path), "--out", str(out), "--no-eval"]) == 0
    capsys.readouterr()
    assert main(["certify", str(out), "--probe", "--probe-windows", "1"]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if "largest ratio found" in s][0]
    found = float(line.split("largest ratio found ")[1].split(";")[0])
    bound = float(line.split("certified bound ")[1].split(";")[0])
    assert 0 < found <= bound


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_ensembles_are_refused_in_one_line_and_write_nothing(tmp_path, capsys):
    a, b = members(tmp_path)
    out = tmp_path / "ens"
    assert main(["ensemble", a, "--out", str(out)]) == 2
    assert "at least two" in one_error_line(capsys) and not out.exists()

    free = export_member(tmp_path, "free", seed=3, method="none")
    assert main(["ensemble", a, str(free), "--out", str(out)]) == 2
    assert "no certificate" in one_error_line(capsys) and not out.exists()

    other = export_member(tmp_path, "other", seed=4, text="a different text with other letters: xyz! " * 40)
    assert main(["ensemble", a, str(other), "--out", str(out)]) == 2
    assert "another tokenizer" in one_error_line(capsys) and not out.exists()

    longer = export_member(tmp_path, "longer", seed=5, context=8)
    assert main(["ensemble", a, str(longer), "--out", str(out)]) == 2
    assert "one context length" in one_error_line(capsys)

    before = sorted(p.name for p in (tmp_path / "m0").iterdir())
    assert main(["ensemble", a, b, "--out", a, "--no-eval"]) == 2
    assert "not an empty directory" in one_error_line(capsys)
    assert sorted(p.name for p in (tmp_path / "m0").iterdir()) == before
    # checked first, before any member is opened or evaluated
    assert main(["ensemble", a, str(tmp_path / "nope"), "--out", a]) == 2
    assert "not an empty directory" in one_error_line(capsys)

    assert main(["ensemble", a, b, "--out", str(out), "--no-eval"]) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "the", "--tokens", "3"]) == 2
    line = one_error_line(capsys)
    assert "ensemble" in line and "member_0" in line
    assert math.isfinite(json.loads((out / "ensemble.json").read_text())["certificate"]["lipschitz_bound"])

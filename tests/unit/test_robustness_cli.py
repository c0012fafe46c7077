"""`distlip robustness` and `distlip certify --probe` on a tiny exported model."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_robustness import cap_weights

from distlip.checkpoint.export import save_model
from distlip.cli import _default_plot, main
from distlip.config import load_config
from distlip.data.in_memory import load_char_corpus
from distlip.model import LipschitzTransformer

TEXT = "the cat sat on the mat. the dog ate the log. " * 40


pytestmark = pytest.mark.usefixtures("one_thread")


def export_tiny(tmp_path, method: str = "hard_cap"):
    """A random 1×16 model (every matrix random, then capped at 1) exported with its config."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    over = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.context=16", "data.source=text",
            f"data.path={text}", f"constraint.method={method}", "constraint.sigma_max=1"]
    if method == "none":
        over.append("constraint.embed_cap=false")
    cfg = load_config(None, over)
    tok, _, _ = load_char_corpus("text", str(text), cfg.data.val_fraction)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=tok.vocab_size))
    torch.manual_seed(0)
    model = LipschitzTransformer(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    cap_weights(model, 1.0)
    out = tmp_path / f"model-{method}"
    save_model(out, dict(model.named_parameters()), cfg, tok)
    return out


def test_robustness_prints_a_table_and_writes_a_plot(tmp_path, capsys):
    path = export_tiny(tmp_path)
    png = tmp_path / "r.png"
    assert main(["robustness", str(path), "--windows", "3", "--eps", "0.01", "1", "--steps", "3",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "clean accuracy" in out and "median certified radius" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0.01", "1 "))]
    assert len(rows) == 2 and all(r[1].endswith("%") and r[2].endswith("%") for r in rows)
    assert png.is_file() and png.stat().st_size > 1000


def test_the_plot_goes_beside_the_model_not_into_the_working_directory(tmp_path, capsys, monkeypatch):
    path = export_tiny(tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["robustness", str(path), "--windows", "2", "--eps", "0.5", "--steps", "1"]) == 0
    assert (path / "robustness.png").is_file() and not any(cwd.iterdir())
    assert f"plot: {path / 'robustness.png'}" in capsys.readouterr().out


@pytest.mark.parametrize(("given", "plot"), [("run/step_000400", "run"), ("run", "run"), ("model", "model")])
def test_a_checkpoint_plot_goes_to_its_run_directory_not_into_the_checkpoint(given, plot):
    assert _default_plot(given) == Path(plot) / "robustness.png"


def test_an_unconstrained_model_is_attacked_but_not_certified(tmp_path, capsys):
    path = export_tiny(tmp_path, method="none")
    assert main(["robustness", str(path), "--windows", "2", "--eps", "0.5", "--steps", "2", "--png", ""]) == 0
    captured = capsys.readouterr()
    assert "not certified" in captured.err and "not certified" in captured.out
    row = next(line.split() for line in captured.out.splitlines() if line.strip().startswith("0.5"))
    assert row[1] == "-" and row[2].endswith("%")


@pytest.mark.parametrize("eps", ["0", "-0.1"])
def test_non_positive_eps_is_refused_in_one_line(tmp_path, capsys, eps):
    path = export_tiny(tmp_path)
    assert main(["robustness", str(path), "--eps", "0.1", eps]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--eps" in err and "> 0" in err


def test_a_run_directory_without_a_model_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    assert main(["robustness", str(tmp_path / "empty_run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty_run" in err


def test_probe_reports_looseness_and_stays_under_the_bound(tmp_path, capsys):
    path = export_tiny(tmp_path)
    assert main(["certify", str(path), "--probe", "--probe-windows", "1"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("largest ratio found"))
    found = float(line.split()[3].rstrip(";"))
    bound = float(line.split("certified bound ")[1].split(";")[0])
    assert 0 < found <= bound


def test_probe_names_the_model_when_a_ratio_beats_the_bound(tmp_path, capsys, monkeypatch):
    # A certificate a hundred times too small must be caught by the probe.
    import distlip.robustness_report as report

    real = report.bounds_at
    monkeypatch.setattr(report, "bounds_at", lambda norms, cfg: tuple(
        (lambda R, f=f: f(R) / 100) for f in real(norms, cfg)))
    path = export_tiny(tmp_path)
    assert main(["certify", str(path), "--probe", "--probe-windows", "1"]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "above the certified bound" in err

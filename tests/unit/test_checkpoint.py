"""Single-process checkpoints: bit-exact resume, fallback past a damaged checkpoint, refusals,
plain-tensor files, and the export / sample / certify commands on checkpoints."""

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from distlip.checkpoint.export import load_model
from distlip.checkpoint.files import CheckpointWarning
from distlip.checkpoint.state import RANK_FILE, open_model, read_rank_files
from distlip.checkpoint.store import CheckpointStore
from distlip.cli import build_parser
from distlip.cli import main as cli
from distlip.config import load_config
from distlip.errors import CheckpointError, ConfigError
from distlip.lipschitz.certificate import exact_norms, norm_keys
from distlip.model import matrix_of
from distlip.preemption import REQUEUE_EXIT_CODE, REQUEUE_FILE_ENV
from distlip.trainer import Trainer

SMOKE = "configs/smoke.yaml"
FAST = ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_heads=2", "model.context=16",
        "train.batch_size=8", "train.eval_every=0", "train.log_every=1", "train.steps=10"]


def make_trainer(out, *overrides) -> Trainer:
    torch.set_num_threads(1)
    return Trainer(load_config(SMOKE, [*FAST, *overrides]), out)


@pytest.mark.parametrize("mode", [["optim.embed=adam"], ["optim.embed=colnorm"],
                                  ["optim.name=adamw", "optim.lr=0.01"], ["model.dropout=0.2"]])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, mode):
    # spectral_normalize keeps power-iteration vectors, so they must be restored too; dropout's
    # masks come from the RNG, so its state must be too
    assert_resume_is_uninterrupted(tmp_path, [*mode, "constraint.method=spectral_normalize"])


def assert_resume_is_uninterrupted(tmp_path, extra: list[str], steps: int = 10, split: int = 4) -> None:
    """`steps` steps in one run, and `split` steps, a checkpoint and the rest in a resumed one:
    the same losses and the same weights, bit for bit."""
    whole = make_trainer(tmp_path / "whole", *extra)
    reference = [whole.train_step()[0] for _ in range(steps)]
    first = make_trainer(tmp_path / "split", *extra)
    losses = [first.train_step()[0] for _ in range(split)]
    first.save()
    second = make_trainer(tmp_path / "split", *extra, "train.resume=auto")
    assert second.step == split
    losses += [second.train_step()[0] for _ in range(steps - split)]
    assert losses == reference
    for name, p in whole.params.items():
        assert torch.equal(p, second.params[name]), name


def test_rank_file_holds_plain_tensors_keyed_by_name(tmp_path):
    trainer = make_trainer(tmp_path, "optim.embed=adam")
    trainer.train_step()
    trainer.save()
    state = torch.load(tmp_path / "step_000001" / RANK_FILE.format(0), weights_only=True)
    assert set(state["weights"]) == set(trainer.params)
    assert set(state["momentum"]) == set(trainer.matrices)
    assert set(state["adam"]["embed.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    # power-iteration vectors: per matrix, and per head block of W_q, W_k, W_v
    assert {matrix_of(k) for k in state["constraint"]} <= set(trainer.matrices)
    assert set(state["sigma"]) == set(norm_keys(trainer.matrices, trainer.cfg.model.n_heads))
    assert {"data", "rng"} <= set(state)
    manifest = json.loads((tmp_path / "step_000001" / "manifest.json").read_text())
    assert manifest["meta"]["config"]["model"]["d_model"] == 16 and manifest["meta"]["tokenizer"]["kind"] == "char"


def test_run_saves_periodically_appends_metrics_and_resume_auto_continues(tmp_path, capsys):
    args = ["train", "--config", SMOKE, "--out", str(tmp_path), *FAST, "train.save_every=3", "optim.decay_start=1.0"]
    assert cli([*args, "train.steps=7"]) == 0
    assert [p.name for p in CheckpointStore(tmp_path).tag_dirs()] == ["step_000003", "step_000006", "step_000007"]
    assert cli([*args, "--resume", "auto"]) == 0  # train.steps=10 from the FAST overrides
    assert "resumed from" in capsys.readouterr().err
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    events = [(r["step"], r.get("event")) for r in map(json.loads, lines)]
    assert (0, "start") in events and (7, "resume") in events and (10, "final") in events
    assert [s for s, e in events if e is None] == list(range(1, 11))
    assert build_parser().parse_args(["train", "--resume", "auto"]).resume == "auto"


def test_signal_during_a_step_checkpoints_that_step_and_exits_for_requeue(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "requeue"
    monkeypatch.setenv(REQUEUE_FILE_ENV, str(marker))
    trainer = make_trainer(tmp_path / "run")
    engine_step = trainer.engine.step

    def step(index, total):
        if index == 2:  # while the third step runs, between its backward and its update
            os.kill(os.getpid(), signal.SIGUSR2)
        return engine_step(index, total)

    monkeypatch.setattr(trainer.engine, "step", step)
    with pytest.raises(SystemExit) as exited:
        trainer.run()
    assert exited.value.code == REQUEUE_EXIT_CODE and marker.exists()
    assert [p.name for p in CheckpointStore(tmp_path / "run").tag_dirs()] == ["step_000003"]
    assert f"checkpoint of step 3 committed in {tmp_path / 'run'}; exiting with status 75" in capsys.readouterr().err
    assert make_trainer(tmp_path / "run", "train.resume=auto").step == 3


def test_truncated_shard_falls_back_to_the_previous_checkpoint_with_a_warning(tmp_path):
    trainer = make_trainer(tmp_path)
    for _ in range(2):
        trainer.train_step()
        trainer.save()
    shard = tmp_path / "step_000002" / RANK_FILE.format(0)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.warns(CheckpointWarning, match=r"step_000002 skipped: truncated file distlip_rank0\.pt"):
        resumed = make_trainer(tmp_path, "train.resume=auto")
    assert resumed.step == 1
    with pytest.raises(CheckpointError, match="step_000002 is unusable: truncated file"):
        make_trainer(tmp_path / "other", f"train.resume={tmp_path / 'step_000002'}")


def test_checkpoint_of_another_model_shape_is_refused_naming_the_setting(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_step()
    trainer.save()
    with pytest.raises(ConfigError, match=r"model\.d_model=16 there, 32 here"):
        make_trainer(tmp_path, "model.d_model=32", "train.resume=auto")
    with pytest.raises(ConfigError, match=r"optim\.embed='colnorm' there, 'adam' here"):
        make_trainer(tmp_path, "optim.embed=adam", "train.resume=auto")


def test_loading_never_unpickles_objects(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.begin(1)
    torch.save({"format": 1, "weights": {}, "payload": CheckpointWarning("an object")}, path / RANK_FILE.format(0))
    ckpt = store.commit(1, {})
    with pytest.raises(CheckpointError, match="cannot read .*distlip_rank0.pt"):
        read_rank_files(CheckpointStore(tmp_path).resolve(str(ckpt)))


def test_export_sample_and_certify_work_on_checkpoints(tmp_path, capsys):
    trainer = make_trainer(tmp_path / "run", "optim.embed=adam")
    for _ in range(3):
        trainer.train_step()
    trainer.save()
    ckpt = tmp_path / "run" / "step_000003"
    assert cli(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0  # a run dir: its newest
    assert "exported step 3" in capsys.readouterr().out
    exported, cfg, tok, caps = load_model(tmp_path / "exported")
    from_ckpt, _, _, caps_ckpt = open_model(ckpt)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer.engine.forward(x)
        assert torch.equal(exported(x), expected) and torch.equal(from_ckpt(x), expected)
    assert caps == caps_ckpt
    for source in (ckpt, tmp_path / "exported"):
        assert cli(["certify", str(source)]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("lipschitz_bound: ")
    # A matrix pushed over its cap after export: certify still prints the table and the bound, and fails.
    weights = load_file(str(tmp_path / "exported" / "model.safetensors"))
    weights["blocks.0.mlp.fc_in.weight"] *= 2 * caps["blocks.0.mlp.fc_in.weight"] / exact_norms(
        {"w": weights["blocks.0.mlp.fc_in.weight"]})["w"]
    save_file(weights, str(tmp_path / "exported" / "model.safetensors"))
    assert cli(["certify", str(tmp_path / "exported")]) == 1
    out, err = capsys.readouterr()
    assert "blocks.0.mlp.fc_in.weight" in next(line for line in out.splitlines() if "EXCEEDS" in line)
    assert out.splitlines()[-1].startswith("lipschitz_bound: ")
    assert err.strip() == "error: 1 matrices exceed their cap: blocks.0.mlp.fc_in.weight"
    for source in (ckpt, tmp_path / "exported"):
        assert cli(["sample", str(source), "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3"]) == 0
    first, second = capsys.readouterr().out.splitlines()[-2:]
    assert first == second and first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 20
    shutil.rmtree(ckpt)
    assert cli(["export", str(tmp_path / "run"), str(tmp_path / "again")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err

"""Bad input across the CLI, as a table: every subcommand × a missing path, a directory where a
file is expected (and a file where a directory is), an unreadable path, a damaged safetensors, a
config.json of another version and weights or a checkpoint of another model size. Each gives exit
code 2 (1 for a failed check), exactly one `error:` line naming the problem and the fix, no
traceback, and leaves every file as it was."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distlip.cli import main

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")
QUIET = ["train.progress=false", "train.tensorboard=false", "train.eval_every=0"]
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One real smoke run (2 steps, a checkpoint, the run's own export) and an exported copy."""
    before = torch.get_num_threads()
    d = tmp_path_factory.mktemp("bad_input")
    assert main(["train", "--config", SMOKE, "--out", str(d / "run"), "train.steps=2", *QUIET]) == 0
    assert main(["export", str(d / "run"), str(d / "model")]) == 0
    torch.set_num_threads(before)
    (d / "text.txt").write_text("the cat sat on the mat. " * 50)
    (d / "afile").write_text("not a directory\n")
    (d / "emptydir").mkdir()
    return d


# ---- faults: each takes the work directory and damages something in it ----------------------

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 16)


def replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def unknown_key(meta):
    meta["config"]["model"]["rotary"] = True


def missing_key(meta):  # an older file without d_model: the default (another size) no longer fits the weights
    del meta["config"]["model"]["d_model"]


def future_format(meta):
    meta["format"] = 99


def other_size(meta):
    meta["config"]["model"]["d_model"] = 64


def scale_weights(path: Path) -> None:
    tensors = load_file(str(path))
    save_file({n: t * 10 if n != "embed.weight" else t for n, t in tensors.items()}, str(path))


def rank_file(w: Path) -> Path:
    return next((w / "run").glob("step_*/distlip_rank0.pt"))


def step_dir(w: Path) -> Path:
    return rank_file(w).parent


# ---- the commands reading a model: certify, sample, robustness, ensemble (as its first member) ------

def reader_argv(cmd: str, path: Path) -> list[str]:
    extra = {"sample": ["--prompt", "a", "--tokens", "2"],
             "robustness": ["--windows", "2", "--steps", "1", "--restarts", "1", "--png", ""],
             "ensemble": ["model", "--out", "ensemble", "--no-eval"]}.get(cmd, [])
    return [cmd, str(path), *extra]


# fault id → (prepare(w) → the path given to the command, substrings of the error line)
MODEL_FAULTS = {
    "missing path": (lambda w: w / "nope", ["does not exist", "give a step_NNNNNN directory"]),
    "file for a directory": (lambda w: w / "afile", ["is not a checkpoint", "give a step_NNNNNN directory"]),
    "path inside a file": (lambda w: w / "afile" / "model", ["does not exist", "give a step_NNNNNN"]),
    "empty directory": (lambda w: w / "emptydir", ["is not a checkpoint", "or a run directory"]),
    "safetensors is a directory": (lambda w: replace_with_dir(w / "model" / "model.safetensors") or w / "model",
                                   ["needs model.safetensors and config.json as files", "distlip export"]),
    "safetensors is a FIFO": (lambda w: replace_with_fifo(w / "model" / "model.safetensors") or w / "model",
                              ["needs model.safetensors and config.json as files", "distlip export"]),
    "truncated safetensors": (lambda w: truncate(w / "model" / "model.safetensors") or w / "model",
                              ["cannot read", "model.safetensors", "damaged", "distlip export"]),
    "garbage safetensors": (lambda w: garbage(w / "model" / "model.safetensors") or w / "model",
                            ["cannot read", "model.safetensors", "damaged", "distlip export"]),
    "config.json unknown key": (lambda w: edit_json(w / "model" / "config.json", unknown_key) or w / "model",
                                ["config.json", "model.rotary", "distlip export"]),
    "config.json missing key": (lambda w: edit_json(w / "model" / "config.json", missing_key) or w / "model",
                                ["does not match the model its config describes", "distlip export"]),
    "config.json future format": (lambda w: edit_json(w / "model" / "config.json", future_format) or w / "model",
                                  ["format 99", "this version reads 1", "distlip export"]),
    "config.json not JSON": (lambda w: (w / "model" / "config.json").write_text("{oops") and w / "model",
                             ["config.json", "JSONDecodeError", "distlip export"]),
    "weights of another size": (lambda w: edit_json(w / "model" / "config.json", other_size) or w / "model",
                                ["(32, 32) vs (64, 64)", "distlip export"]),
    "truncated checkpoint": (lambda w: truncate(rank_file(w)) or step_dir(w),
                             ["is unusable", "truncated file distlip_rank0.pt", "give another checkpoint"]),
}


@pytest.fixture
def work(base, tmp_path, monkeypatch):
    """A private copy of the run and the export; the command runs with it as the working directory,
    so stray files written there count as changes too."""
    w = tmp_path / "w"
    shutil.copytree(base, w, symlinks=True)
    monkeypatch.chdir(w)
    return w


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` → its kind, mode and (files) content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = ("link:" + os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else \
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else stat.S_IFMT(st.st_mode)
        out[str(p.relative_to(root))] = f"{kind} {stat.S_IMODE(st.st_mode):o}"
    return out


def check_refusal(work: Path, capsys, argv: list[str], code: int, words: list[str]) -> str:
    before = snapshot(work)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert snapshot(work) == before
    return errors[0]


@pytest.mark.parametrize("fault", list(MODEL_FAULTS))
@pytest.mark.parametrize("cmd", ["certify", "sample", "robustness", "ensemble"])
def test_model_readers_refuse_bad_input_in_one_line(work, capsys, cmd, fault):
    prepare, words = MODEL_FAULTS[fault]
    path = prepare(work)
    check_refusal(work, capsys, reader_argv(cmd, path), 2, words)


@pytest.mark.skipif(ROOT, reason="runs as root, which reads a chmod 000 file anyway; the FIFO and "
                                 "path-inside-a-file rows cover unreadable paths")
@pytest.mark.parametrize("cmd", ["certify", "sample", "robustness"])
def test_an_unreadable_safetensors_is_refused(work, capsys, cmd):
    (work / "model" / "model.safetensors").chmod(0)
    check_refusal(work, capsys, reader_argv(cmd, work / "model"), 2, ["cannot read", "Permission"])


def test_certify_fails_its_check_with_exit_1_when_a_matrix_exceeds_its_cap(work, capsys):
    scale_weights(work / "model" / "model.safetensors")
    check_refusal(work, capsys, ["certify", str(work / "model")], 1, ["exceed their cap"])


# ---- export: a checkpoint in, a model directory out ---------------------------------------------

EXPORT_FAULTS = {
    "missing checkpoint": (lambda w: [str(w / "nope"), str(w / "out")], ["does not exist", "give a step_NNNNNN"]),
    "file for the checkpoint": (lambda w: [str(w / "afile"), str(w / "out")], ["is not a checkpoint"]),
    "exported model for the checkpoint": (lambda w: [str(w / "model"), str(w / "out")], ["is not a checkpoint"]),
    "truncated checkpoint": (lambda w: truncate(rank_file(w)) or [str(step_dir(w)), str(w / "out")],
                             ["is unusable", "truncated file", "give another checkpoint"]),
    "output is a file": (lambda w: [str(w / "run"), str(w / "afile")],
                         ["cannot write the model to", "afile", "give a directory path"]),
    "output inside a file": (lambda w: [str(w / "run"), str(w / "afile" / "out")],
                             ["cannot write the model to", "Not a directory", "give a directory path"]),
}


@pytest.mark.parametrize("fault", list(EXPORT_FAULTS))
def test_export_refuses_bad_input_in_one_line(work, capsys, fault):
    prepare, words = EXPORT_FAULTS[fault]
    check_refusal(work, capsys, ["export", *prepare(work)], 2, words)


# ---- train -----------------------------------------------------------------------------------

def train_argv(w: Path, *extra: str, config: str = SMOKE, out: str = "run2") -> list[str]:
    return ["train", "--config", config, "--out", str(w / out), "train.steps=4", *QUIET, *extra]


TRAIN_FAULTS = {
    "missing config": (lambda w: train_argv(w, config=str(w / "nope.yaml")), ["'", "nope.yaml' not found", "configs/"]),
    "config is a directory": (lambda w: train_argv(w, config=str(w / "emptydir")), ["is a directory", "configs/"]),
    "config inside a file": (lambda w: train_argv(w, config=str(w / "afile" / "c.yaml")), ["not found", "configs/"]),
    "config is not YAML": (lambda w: (w / "bad.yaml").write_text("model: [")
                           and train_argv(w, config=str(w / "bad.yaml")),
                           ["bad.yaml", "not valid YAML", "at line 1", "fix that line"]),
    "output is a file": (lambda w: train_argv(w, out="afile"), ["afile", "choose another --out"]),
    "missing text": (lambda w: train_argv(w, "data.source=text", f"data.path={w / 'nope.txt'}"),
                     ["nope.txt' not found", "set data.path"]),
    "text is a directory": (lambda w: train_argv(w, "data.source=text", f"data.path={w / 'emptydir'}"),
                            ["emptydir' is a directory", "set data.path"]),
    "missing tokenizer": (lambda w: train_argv(w, "data.source=text", f"data.path={w / 'text.txt'}",
                                               "data.val_tokens=100", f"data.tokenizer={w / 'nope.json'}"),
                          ["tokenizer file", "nope.json' not found"]),
    "missing checkpoint to resume": (lambda w: train_argv(w, "--resume", str(w / "nope")),
                                     ["nope not found", "'auto', or a checkpoint directory"]),
    "truncated checkpoint to resume": (lambda w: truncate(rank_file(w)) or train_argv(w, "--resume", str(step_dir(w))),
                                       ["is unusable", "truncated file"]),
    "low rank above a matrix's side": (lambda w: train_argv(w, "compression.compressor=lowrank", "compression.rank=64"),
                                        ["compression.rank=64", "blocks.0.attn.q.weight of shape (32, 32)", "≤ 32"]),
    "teacher of another vocabulary": (lambda w: train_argv(w, "data.source=text", f"data.path={w / 'text.txt'}",
                                                           f"train.teacher={w / 'model'}"),
                                      ["train.teacher", "another tokenizer", "same text"]),
    "checkpoint of another size": (lambda w: train_argv(w, "model.d_model=64", "--resume", "auto", out="run"),
                                   ["model.d_model=32 there, 64 here", "resume with the checkpoint's settings"]),
}


@pytest.mark.parametrize("fault", list(TRAIN_FAULTS))
def test_train_refuses_bad_input_in_one_line(work, capsys, fault):
    prepare, words = TRAIN_FAULTS[fault]
    check_refusal(work, capsys, prepare(work), 2, words)


# ---- tokenizer train -------------------------------------------------------------------------

def tok_argv(w: Path, *extra: str, out: str = "tok") -> list[str]:
    return ["tokenizer", "train", "--vocab-size", "300", "--out", str(w / out), *extra]


TOKENIZER_FAULTS = {
    "missing config": (lambda w: tok_argv(w, "--config", str(w / "nope.yaml")), ["nope.yaml' not found"]),
    "missing text": (lambda w: tok_argv(w, "--source", "text", "--path", str(w / "nope.txt")),
                     ["no text files match", "nope.txt"]),
    "output is a file": (lambda w: tok_argv(w, "--source", "text", "--path", str(w / "text.txt"), out="afile"),
                         ["afile' is a file", "give a directory"]),
    "output inside a file": (lambda w: tok_argv(w, "--source", "text", "--path", str(w / "text.txt"), out="afile/t"),
                             ["afile' is a file", "give a directory"]),
}


@pytest.mark.parametrize("fault", list(TOKENIZER_FAULTS))
def test_tokenizer_refuses_bad_input_in_one_line(work, capsys, fault):
    prepare, words = TOKENIZER_FAULTS[fault]
    check_refusal(work, capsys, prepare(work), 2, words)


# ---- slurm-cmd: the same one line as every other subcommand ------------------------------------

def test_slurm_cmd_refuses_bad_input_in_one_line(work, capsys, monkeypatch):
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    check_refusal(work, capsys, ["slurm-cmd", "--dry-run"], 2, ["no training command", "put it after --"])
    check_refusal(work, capsys, ["slurm-cmd", "--dry-run", "--", "-m", "distlip", "train"], 2,
                  ["missing SLURM variables"])


# ---- end to end: the installed entry point, no traceback ---------------------------------------

def test_the_process_prints_one_line_and_no_traceback(work):
    garbage(work / "model" / "model.safetensors")
    before = snapshot(work)
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "distlip", "sample", str(work / "model"), "--prompt", "a"],
                          capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot read"), proc.stderr
    assert proc.stdout == ""
    assert snapshot(work) == before

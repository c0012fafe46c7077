"""Checkpoints of 2-process runs (gloo, CPU, fp32). Bit-exact resume: after SIGKILL (DeepSpeed
ZeRO-1 embedding), after SIGUSR2 (ZeRO-0), after a clean stop (colnorm embedding, and with
compressed communication). 2 → 1 and 1 → 2 processes re-shard by name (DeepSpeed ZeRO-1/3 ↔
torch Adam) and match the uninterrupted run to LOSS_RTOL. A 2-rank checkpoint exports without
a process group.

Runs share three torchrun launches (each costs ~10 s). The learning rate is constant
(optim.decay_start=1), so a run started with fewer or with a huge train.steps is a prefix of
the STEPS-step reference, and is resumed with train.steps=STEPS.
"""

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from distlip.checkpoint.export import load_model
from distlip.checkpoint.state import (
    certified_weights,
    export_checkpoint,
    find_checkpoint,
    merged_field,
    open_model,
    read_rank_files,
)
from distlip.cli import main as cli
from distlip.config import load_config
from distlip.errors import CheckpointError
from distlip.lipschitz.certificate import certify_weights
from distlip.preemption import REQUEUE_EXIT_CODE, REQUEUE_FILE_ENV
from distlip.slurm import FORWARDED_SIGNALS
from distlip.trainer import Trainer

from helpers import HELPERS, ROOT

STEPS = 30
COMMON = ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_heads=2",
          "model.context=16", "train.batch_size=8", "train.eval_every=0", "train.log_every=1",
          "optim.decay_start=1.0", "train.save_every=10", "train.keep_last=5", "constraint.method=spectral_normalize"]
ADAM_Z0 = ["optim.embed=adam", "dist.zero_stage=0"]
ADAM_Z1 = ["optim.embed=adam", "dist.zero_stage=1"]
ADAM_Z3 = ["optim.embed=adam", "dist.zero_stage=3"]
COLNORM = ["optim.embed=colnorm", "dist.zero_stage=0"]
# Top-k gradients with EF21 and an EF21-P top-k downlink: per-rank estimator state and owners' masters.
COMPRESSED = [*COLNORM, "compression.compressor=topk", "compression.ratio=0.5", "compression.downlink=topk",
              "compression.downlink_ratio=0.5", "compression.warmup_steps=2"]
# MARINA on one batch: its estimate and the previous weights of its second backward pass, with
# DeepSpeed's Adam on the embedding.
MARINA = [*ADAM_Z1, "compression.compressor=randk", "compression.ratio=0.1", "compression.estimator=marina",
          "compression.warmup_steps=2"]
# A streamed jsonl corpus: the pipeline's position is per rank.
def stream(corpus: Path) -> list[str]:
    return ["data.source=jsonl", f"data.path={corpus}", "data.val_tokens=300"]


def write_corpus(directory: Path) -> Path:
    """Two jsonl files of short documents (one per rank under split_dataset_by_node)."""
    directory.mkdir()
    rng = random.Random(0)
    words = ["thou", "art", "the", "king", "of", "rose", "night", "and", "wherefore"]
    for f in range(2):
        lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))})
                 for _ in range(200)]
        (directory / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


# Runs stopped cleanly after 10 steps (a prefix of the reference: the learning rate is constant) and resumed.
SPLIT = {"colnorm": COLNORM, "compressed": COMPRESSED, "marina": MARINA}
FOREVER = "train.steps=1000000"
# 2 ↔ 1 processes: sharded and single-process steps differ in summation order only; over the 20
# resumed steps that grows to ≈2e-7 (loss) and ≈4e-6 (weights, relative Frobenius) here.
LOSS_RTOL, WEIGHT_RTOL = 1e-5, 1e-4


def train(out: Path, *overrides: str) -> list[str]:
    return ["train", "--config", "configs/smoke.yaml", "--out", str(out), *COMMON, *overrides]


def launch(jobs: list[list[str]], log: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    """One torchrun launch of 2 workers running `jobs` in turn, output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "--signals_to_handle", FORWARDED_SIGNALS, str(HELPERS / "cli_worker.py"), json.dumps(jobs)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (which run in sessions of their own) at once, as a node failure would."""
    if proc.poll() is not None:
        return
    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(family, timeout=30)
    proc.wait()


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail(f"launch timed out:\n{log.read_text()[-3000:]}")


def wait_until(ready, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > end:
            kill(proc)
            pytest.fail(f"the run ended or stalled before the test could interrupt it:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def last_step(run: Path) -> int:
    """The newest step a (running) run has logged; 0 before its first."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    done = [json.loads(line) for line in lines if line.endswith("\n")]  # the last may be half-written
    return max([r["step"] for r in done if r.get("event") is None] or [0])


def losses_after_resume(run: Path) -> tuple[int, dict[int, float]]:
    """(step resumed from, {step: loss}) of the last resumed attempt recorded in metrics.jsonl."""
    recs = records(run)
    start = max(i for i, r in enumerate(recs) if r.get("event") == "resume")
    return recs[start]["step"], {r["step"]: r["loss"] for r in recs[start + 1:] if r.get("event") is None}


def reference_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if r.get("event") is None and "lr" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run, in three launches. Returns paths and what the test observed while interrupting."""
    tmp = tmp_path_factory.mktemp("resume")
    base = 29700 + os.getpid() % 200
    names = ["one", "ref_adam", "ref_adam0", "one_to_two", "usr2", "kill", "stream", "averaged", *SPLIT,
             *(f"ref_{n}" for n in SPLIT)]
    r = {name: tmp / name for name in names}
    corpus = write_corpus(tmp / "corpus")
    torch.set_num_threads(1)
    assert cli(train(r["one"], "optim.embed=adam", f"train.steps={STEPS}")) == 0  # 1-process reference

    # Launch 1: the 2-process references, the first 10 steps of the SPLIT runs, the 1 → 2 resume,
    # then a run stopped by SIGUSR2.
    marker = tmp / "requeue-marker"
    log1 = tmp / "launch1.log"
    proc = launch([train(r["ref_adam"], *ADAM_Z1, f"train.steps={STEPS}"),
                   train(r["ref_adam0"], *ADAM_Z0, f"train.steps={STEPS}"),
                   *(train(r[f"ref_{n}"], *mode, f"train.steps={STEPS}") for n, mode in SPLIT.items()),
                   *(train(r[n], *mode, "train.steps=10") for n, mode in SPLIT.items()),
                   train(r["one_to_two"], *ADAM_Z3, f"train.steps={STEPS}", "--resume", str(r["one"] / "step_000010")),
                   train(r["stream"], *COLNORM, *stream(corpus), "train.steps=10"),
                   train(r["averaged"], *ADAM_Z3, f"train.steps={STEPS}", "train.average_last=3"),
                   train(r["usr2"], *ADAM_Z0, FOREVER)], log1, base, {REQUEUE_FILE_ENV: str(marker)})
    wait_until(lambda: last_step(r["usr2"]) >= 5, proc, log1)
    signalled_after = last_step(r["usr2"])
    os.kill(proc.pid, signal.SIGUSR2)  # as slurm/train.sbatch forwards it: to torchrun, which passes it on
    usr2_status = finish(proc, log1)

    # Launch 2: resume the SPLIT and the preempted runs to the end, then a run that is SIGKILLed
    # after its first checkpoint.
    log2 = tmp / "launch2.log"
    proc = launch([*(train(r[n], *mode, f"train.steps={STEPS}", "--resume", "auto") for n, mode in SPLIT.items()),
                   train(r["usr2"], *ADAM_Z0, f"train.steps={STEPS}", "--resume", "auto"),
                   train(r["kill"], *ADAM_Z1, FOREVER)], log2, base + 1)
    wait_until(lambda: (r["kill"] / "latest").exists(), proc, log2)
    kill(proc)

    # Launch 3: resume the killed run with --resume auto.
    log3 = tmp / "launch3.log"
    assert finish(launch([train(r["kill"], *ADAM_Z1, f"train.steps={STEPS}", "--resume", "auto")], log3, base + 2),
                  log3) == 0, log3.read_text()[-3000:]
    return {**r, "corpus": corpus, "marker": marker, "signalled_after": signalled_after, "usr2_status": usr2_status,
            "logs": [log1.read_text(), log2.read_text(), log3.read_text()]}


def assert_same_final_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_sigkill_then_resume_auto_is_bit_exact(runs):
    resumed_from, losses = losses_after_resume(runs["kill"])
    assert resumed_from >= 10 and resumed_from < STEPS
    ref = reference_losses(runs["ref_adam"])
    assert losses == {s: ref[s] for s in range(resumed_from + 1, STEPS + 1)}  # bit for bit
    assert_same_final_weights(runs["kill"], runs["ref_adam"])


def test_sigusr2_checkpoints_within_a_step_requeues_and_resumes_exactly(runs):
    log = runs["logs"][0]
    assert runs["marker"].exists(), log[-3000:]  # what reaches the batch shell through torchrun
    assert runs["usr2_status"] != 0
    assert f"exiting with status {REQUEUE_EXIT_CODE} to be requeued" in log
    recs = records(runs["usr2"])
    stopped = next(r["step"] for r in recs if r.get("event") == "preempted")
    # Stopped at the first step boundary after the signal reached the workers (exactly: see
    # test_checkpoint.py); here it also travels test → torchrun → workers on 2 busy cores.
    assert runs["signalled_after"] < stopped <= runs["signalled_after"] + 10
    before = recs[:next(i for i, r in enumerate(recs) if r.get("event") == "preempted")]
    assert max(r["step"] for r in before if r.get("event") is None) == stopped  # nothing ran past it
    assert (runs["usr2"] / f"step_{stopped:06d}" / "manifest.json").is_file()  # committed (keep_last=5 kept it)
    resumed_from, losses = losses_after_resume(runs["usr2"])
    assert resumed_from == stopped
    ref = reference_losses(runs["ref_adam0"])
    assert losses == {s: ref[s] for s in range(stopped + 1, STEPS + 1)}
    assert_same_final_weights(runs["usr2"], runs["ref_adam0"])


@pytest.mark.parametrize("name", SPLIT)
def test_stopped_run_resumes_bit_exact(runs, name):
    resumed_from, losses = losses_after_resume(runs[name])
    assert resumed_from == 10
    ref = reference_losses(runs[f"ref_{name}"])
    assert losses == {s: ref[s] for s in range(11, STEPS + 1)}
    assert_same_final_weights(runs[name], runs[f"ref_{name}"])


def test_one_to_two_processes_moves_adam_into_zero3(runs):
    log = runs["logs"][0]
    assert "written by 1: re-sharded by name" in log and "from torch Adam into DeepSpeed ZeRO-3" in log, log[-3000:]
    resumed_from, losses = losses_after_resume(runs["one_to_two"])
    assert resumed_from == 10
    ref = reference_losses(runs["one"])
    for step, loss in losses.items():
        assert loss == pytest.approx(ref[step], rel=LOSS_RTOL), step
    _, cert = export_checkpoint(runs["one"] / "step_000010", runs["one_to_two"].parent / "one10")
    start = next(r for r in records(runs["one_to_two"]) if r.get("event") == "resume")
    assert start["lipschitz_bound"] == pytest.approx(cert.bound, rel=1e-9)  # the loaded weights' exact certificate
    final = [r for r in records(runs["one_to_two"]) if r.get("event") == "final"][-1]
    assert final["certified"]


@pytest.mark.parametrize("ref, mode", [("ref_adam", ADAM_Z1), ("ref_colnorm", COLNORM)])
def test_two_to_one_process_matches_the_uninterrupted_run(runs, ref, mode, tmp_path, capsys):
    ckpt = runs[ref] / "step_000010"
    cfg = load_config("configs/smoke.yaml", [*COMMON, *mode, f"train.steps={STEPS}", f"train.resume={ckpt}"])
    trainer = Trainer(cfg, tmp_path / "run")
    note = capsys.readouterr().err
    assert "written by 2: re-sharded by name the momenta and power-iteration vectors of 13 matrices" in note
    assert ("DeepSpeed ZeRO-1 into torch Adam" in note) == (mode is ADAM_Z1)
    assert "reset: nothing" in note
    _, cert = export_checkpoint(ckpt, tmp_path / "exported")
    assert trainer.certificate(exact=True).bound == pytest.approx(cert.bound, rel=1e-9)
    ref_losses = reference_losses(runs[ref])
    for step in range(11, STEPS + 1):
        loss, _ = trainer.train_step()
        assert loss == pytest.approx(ref_losses[step], rel=LOSS_RTOL), step
    assert not trainer.certificate(exact=True).violations(trainer.caps)
    final = load_file(str(runs[ref] / "model.safetensors"))
    for name, w in final.items():
        mine = trainer.params[name].data
        assert (mine - w).norm() <= WEIGHT_RTOL * w.norm(), name


def test_two_rank_average_of_checkpoints_matches_the_single_process_run(runs):
    # train.average_last=3 on 2 ranks (ZeRO-3 embedding): the model exported is the mean of the
    # run's own checkpoints at steps 10, 20, 30, and that of the 1-process run's
    steps = [10, 20, 30]
    mean = lambda run: {n: sum(certified_weights(read_rank_files(find_checkpoint(run / f"step_{s:06d}")))[n].double()  # noqa: E731
                               for s in steps) / 3 for n in exported}
    exported = load_file(str(runs["averaged"] / "model.safetensors"))
    own, single = mean(runs["averaged"]), mean(runs["one"])
    for name, w in exported.items():
        assert torch.allclose(w.double(), own[name], atol=1e-6), name
        assert (w.double() - single[name]).norm() <= WEIGHT_RTOL * single[name].norm(), name
    final = [r for r in records(runs["averaged"]) if r.get("event") == "final"][-1]
    assert final["averaged_steps"] == steps and final["certified"]
    cfg = load_config("configs/smoke.yaml", [*COMMON, *ADAM_Z3])
    assert final["lipschitz_bound"] == pytest.approx(certify_weights(exported, cfg)[0].bound, rel=1e-9)


def test_two_rank_checkpoint_exports_without_a_process_group(runs, tmp_path):
    ckpt = runs["ref_adam"] / f"step_{STEPS:06d}"
    assert cli(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    exported, _, _, _ = load_model(tmp_path / "exported")
    from_ckpt, _, _, _ = open_model(ckpt)
    trained, _, _, _ = load_model(runs["ref_adam"])  # what the run itself exported at its end
    x = torch.randint(0, exported.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = exported(x)
        assert torch.equal(logits, from_ckpt(x)) and torch.equal(logits, trained(x))


def test_compressed_downlink_checkpoint_resumes_uncompressed_from_the_certified_masters(runs, tmp_path, capsys):
    """Under an EF21-P downlink the forward copies w only approach the owners' masters x; a run
    without compression (here on 1 process) must continue from x, the certified weights."""
    ckpt = runs["ref_compressed"] / "step_000010"
    files = read_rank_files(find_checkpoint(ckpt))
    forward, masters = merged_field(files, "weights"), certified_weights(files)
    assert any(not torch.equal(forward[n], masters[n]) for n in masters)  # w really lags x here
    cfg = load_config("configs/smoke.yaml", [*COMMON, *COLNORM, f"train.steps={STEPS}", f"train.resume={ckpt}"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert "compression state (compression is off in this run)" in capsys.readouterr().err
    for name, x in masters.items():
        assert torch.equal(trainer.params[name].data, x), name
    assert not trainer.certificate(exact=True).violations(trainer.caps)


def test_streaming_checkpoint_moves_to_another_world_size_only_when_asked(runs, tmp_path, capsys):
    """A stream's position is per rank: resuming it on 1 process is refused with the fix named,
    and with data.restart_on_resize=true the stream restarts and training goes on certified."""
    ckpt = runs["stream"] / "step_000010"
    base = [*COMMON, *COLNORM, *stream(runs["corpus"]), "train.steps=14", f"train.resume={ckpt}"]
    with pytest.raises(CheckpointError, match="cannot move from 2 ranks to 1.*data.restart_on_resize=true"):
        Trainer(load_config("configs/smoke.yaml", base), tmp_path / "refused")
    trainer = Trainer(load_config("configs/smoke.yaml", [*base, "data.restart_on_resize=true"]), tmp_path / "run")
    note = capsys.readouterr().err
    assert "reset: the data stream's per-rank position (the stream restarts from its beginning)" in note
    assert trainer.step == 10
    for _ in range(4):
        assert math.isfinite(trainer.train_step()[0])
    assert not trainer.certificate(exact=True).violations(trainer.caps)

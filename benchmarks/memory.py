"""Peak memory through training, evaluation, certificate, checkpoint and export, measured
against the memory model's prediction (`distlip.memory.estimate_memory`).

Each case runs in its own process. Before each phase the process resets its resident-set
high-water mark (Linux: `/proc/self/clear_refs`), so each phase's peak is its own. The model
predicts tensor bytes; the table compares them with the peak minus the runtime's share (what is
resident once the trainer is built, less its parameters: Python, torch, tokenizer, data). The
children run with glibc's mmap threshold fixed at 64 KiB, so freed tensors leave the resident
set instead of staying in malloc's heap.

    python benchmarks/memory.py                       # the small CPU cases
    python benchmarks/memory.py --case 145m           # the 145M preset, 2 × 1024 tokens per step (≈ 3.7 GB resident)
    python benchmarks/memory.py --case 145m --code /tmp/old-checkout   # the same phases on another commit's code

`--code DIR` runs the phases with the distlip package in DIR (an earlier commit's checkout, for
before/after); the prediction always comes from this tree's model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, provenance, table, write_section

PHASES = ("init", "train", "eval", "certificate", "checkpoint", "export")
GIB = 2**30
BASE = ["train.progress=false", "train.tensorboard=false", "train.threads=1", "train.device=cpu",
        "train.dtype=float32", "train.log_every=1", "train.eval_every=0", "train.certify_every=1"]
BPE = ["data.source=shakespeare", "data.val_tokens={val}"]  # with data.tokenizer set by --tokenizer

# name → (preset, overrides, needs the BPE tokenizer). Each stresses one term of the model.
CASES = {
    "wide-vocab": ("configs/nanogpt-145m.yaml", [*BPE, "model.n_layers=2", "model.d_model=256", "model.n_heads=2",
                                                 "model.context=256", "train.batch_size=8", "train.grad_accum=1",
                                                 "optim.embed=colnorm", "data.document_mask=false"], True),
    "deep": ("configs/shakespeare-paper.yaml", ["model.n_layers=8", "model.d_model=512", "model.n_heads=4",
                                          "model.context=512", "train.batch_size=8"], False),
    "doc-mask-adam": ("configs/nanogpt-145m.yaml", [*BPE, "model.n_layers=2", "train.batch_size=2",
                                                    "train.grad_accum=1", "train.logits_chunk_mib=64"], True),
    "145m": ("configs/nanogpt-145m.yaml", [*BPE, "train.batch_size=2", "train.grad_accum=1"], True),
}


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child(args) -> None:
    """Run the phases in this process and print one JSON line: peaks per phase, the baseline."""
    import torch

    from distlip.config import load_config
    from distlip.trainer import Trainer, evaluate

    try:
        from distlip.checkpoint.export import save_model
    except ImportError:  # the flat layout of earlier commits
        from distlip.export import save_model

    cfg = load_config(ROOT / args.preset, args.set)
    out = Path(args.out)
    peaks = {}
    reset_peak()
    trainer = Trainer(cfg, out)
    peaks["init"] = vm("VmHWM")
    # The runtime (Python, torch, tokenizer, data) is what is resident besides the parameters.
    baseline = vm("VmRSS") - sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    reset_peak()
    for _ in range(args.steps):
        trainer.train_step()
    peaks["train"] = vm("VmHWM")
    reset_peak()
    vl, va = evaluate(trainer.engine, trainer.data.val_x, trainer.data.val_y, trainer.autocast, args.eval_windows)
    peaks["eval"] = vm("VmHWM")
    reset_peak()
    cert = trainer.certificate(exact=True)
    peaks["certificate"] = vm("VmHWM")
    reset_peak()
    trainer.save()
    peaks["checkpoint"] = vm("VmHWM")
    reset_peak()
    save_model(out, trainer.engine.master_weights(), trainer.cfg, trainer.data.tokenizer, {})
    peaks["export"] = vm("VmHWM")
    windows = len(trainer.data.val_x) if args.eval_windows <= 0 else min(args.eval_windows, len(trainer.data.val_x))
    print(json.dumps({"baseline": baseline, "peaks": peaks, "config": trainer.cfg.to_dict(), "val_loss": vl,
                      "val_acc": va, "bound": cert.bound, "eval_windows": windows,
                      "torch": torch.__version__}), flush=True)


def predictions(cfg_dict: dict) -> dict[str, float]:
    """The memory model's bytes for each phase."""
    from distlip.config import config_from_dict
    from distlip.memory import estimate_memory

    est = estimate_memory(config_from_dict(cfg_dict))
    return {"train": max(est.train_peak, est.step_peak), "eval": est.eval_peak, "certificate": est.resting_peak,
            "checkpoint": est.checkpoint_peak, "export": est.export_peak}


def ensure_tokenizer(path: Path) -> Path:
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "distlip", "tokenizer", "train", "--vocab-size", "50257", "--source",
                        "shakespeare", "--out", str(path.parent)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return path


def run_case(name: str, args, work: Path) -> dict:
    preset, sets, bpe = CASES[name]
    sets = [s.format(val=args.val_windows * 1024 + 1) for s in sets]
    if bpe:
        sets.append(f"data.tokenizer={ensure_tokenizer(Path(args.tokenizer))}")
    code = Path(args.code).resolve() if args.code else ROOT
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--preset", preset, "--out",
           str(work / name), "--steps", str(args.steps), "--eval-windows", str(args.eval_windows),
           "--set", *BASE, *sets, *args.set]
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["name"] = name
    result["predicted"] = predictions(result["config"])
    return result


def rows(result: dict) -> list[dict]:
    base, m = result["baseline"], result["config"]["model"]
    t = result["config"]["train"]
    out = []
    for phase in PHASES[1:]:  # building the trainer sets the baseline
        measured = result["peaks"][phase] - base
        predicted = result["predicted"][phase]
        out.append({"case": result["name"], "phase": phase,
                    "what": f"{m['d_model']}×{m['n_layers']}, V {m['vocab_size']}, {t['batch_size']}×"
                            f"{result['config']['data']['seq_len'] or m['context']}",
                    "rss_gib": result["peaks"][phase] / GIB, "measured_gib": measured / GIB,
                    "predicted_gib": predicted / GIB, "ratio": measured / predicted if predicted else None})
    return out


COLUMNS = [("case", "{}"), ("what", "{}"), ("phase", "{}"), ("rss_gib", "{:.2f}"), ("measured_gib", "{:.2f}"),
           ("predicted_gib", "{:.2f}"), ("ratio", "{:.2f}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", default=["wide-vocab", "deep", "doc-mask-adam"], choices=list(CASES))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=16, help="validation windows evaluated (0: all held out)")
    ap.add_argument("--val-windows", type=int, default=8, help="BPE cases: windows of 1024 tokens held out")
    ap.add_argument("--tokenizer", default=str(ROOT / "runs" / "bench-bpe" / "tokenizer.json"),
                    help="byte-level BPE (50257) on the packaged plays; trained here when missing")
    ap.add_argument("--code", default="", help="run the phases with the distlip package in this directory")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every case")
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument("--from-json", nargs="*", default=[],
                    help="no runs: tabulate raw results written by --json, with this tree's predictions")
    ap.add_argument("--results", action="store_true", help="record the table in benchmarks/RESULTS.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.from_json:
        results = [r for path in args.from_json for r in json.loads(Path(path).read_text())]
        for r in results:
            r["predicted"] = predictions(r["config"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = [run_case(name, args, Path(tmp)) for name in args.case]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    text = table([r for res in results for r in rows(res)], COLUMNS)
    print(text)
    if args.results:
        cmd = "python benchmarks/memory.py " + " ".join(sys.argv[1:]).replace(" --results", "")
        write_section(ROOT / "benchmarks" / "RESULTS.md", "## Peak memory against the memory model (CPU)",
                      f"## Peak memory against the memory model (CPU)\n\n{provenance()}. Command: `{cmd}`.\n\n"
                      f"{text}\n")


if __name__ == "__main__":
    main()

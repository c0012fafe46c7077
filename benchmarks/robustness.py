"""What the certificate buys: certified vs empirical robust accuracy, constrained vs unconstrained.

Trains (or reuses, when OUT/NAME/model.safetensors exists; evaluations too, from
OUT/NAME/robustness.json when the settings match) three models of the default size
(128×4, context 128) for the same number of steps: the default recipe (soft cap σmax 3), a
tightly certified one (hard cap with a target bound of 10) and an unconstrained AdamW baseline
(no caps, no embedding cap). For each it reports clean accuracy, the certified bound of
embeddings → logits, the certificate's looseness (bound over the largest ratio the probe
finds), and certified and empirical robust accuracy at several ε, as a table, a PNG and a
section of benchmarks/RESULTS.md.

    python benchmarks/robustness.py                      # packaged plays, 300 steps each
    python benchmarks/robustness.py --text PATH --steps 600 --windows 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, provenance, write_section

from distlip.checkpoint.state import open_model
from distlip.robustness_report import Robustness, evaluate, format_table, plot, probe, validation_windows

MODELS = {
    "default": ["constraint.method=soft_cap", "constraint.sigma_max=3"],
    "tight": ["constraint.method=hard_cap", "constraint.target_bound=10", "optim.lr=2"],
    "adamw": ["constraint.method=none", "constraint.embed_cap=false", "optim.name=adamw", "optim.lr_mult={}"],
}
LABELS = {"default": "default (soft cap σ 3)", "tight": "tight (hard cap, target bound 10)",
          "adamw": "unconstrained (AdamW {lr:g})"}


def train(out: Path, overrides: list[str], steps: int, text: str | None) -> None:
    """`distlip train` on one process and one thread."""
    data = ["data.source=text", f"data.path={text}"] if text else []
    cmd = [sys.executable, "-m", "distlip", "train", "--config", "configs/soft-cap.yaml", "--out", str(out),
           f"train.steps={steps}", "train.threads=1", "train.eval_every=0", "train.progress=false",
           "train.tensorboard=false", *data, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TORCH_COMPILE_DISABLE": "1"},
                          capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: trained, but the run is not certified (no caps)
        raise RuntimeError(f"training {out.name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/robustness", help="run directories (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--text", default=None, help="train on this text file instead of the packaged plays")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--adamw-lr", type=float, default=0.003, help="the unconstrained baseline's learning rate")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--windows", type=int, default=32, help="validation windows evaluated per model")
    ap.add_argument("--probe-windows", type=int, default=2)
    ap.add_argument("--steps-attack", type=int, default=10)
    ap.add_argument("--png", default="benchmarks/robustness.png")
    ap.add_argument("--results", default="benchmarks/RESULTS.md", help="'' to skip writing it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = ROOT / args.out
    results = []
    for name in args.models:
        overrides, label, run = MODELS[name], LABELS[name].format(lr=args.adamw_lr), out / name
        if name == "adamw":
            overrides, run = overrides + [f"optim.lr={args.adamw_lr:g}"], out / f"adamw-lr{args.adamw_lr:g}"
        if not (run / "model.safetensors").is_file():
            print(f"training {run.name} ({args.steps} steps) ...", flush=True)
            train(run, overrides, args.steps, args.text)
        model, cfg, tok, _ = open_model(run)
        settings = {"eps": args.eps, "windows": args.windows, "steps_attack": args.steps_attack,
                    "probe_windows": args.probe_windows}
        saved = run / "robustness.json"  # results of an earlier evaluation with the same settings
        if saved.is_file() and json.loads(saved.read_text())["settings"] == settings:
            results.append(Robustness(**json.loads(saved.read_text())["result"]))
            continue
        x, y = validation_windows(cfg, tok, args.windows)
        start = time.time()
        r = evaluate(label, model, cfg, tok, x, y, args.eps, steps=args.steps_attack, progress=False)
        px, _ = validation_windows(cfg, tok, args.probe_windows)
        r.probe = probe(label, model, cfg, tok, px)
        print(f"{run.name}: evaluated in {time.time() - start:.0f} s", flush=True)
        saved.write_text(json.dumps({"settings": settings, "result": dataclasses.asdict(r)}))
        results.append(r)
    table = format_table(results)
    print(table)
    png = plot(results, ROOT / args.png)
    print(f"plot: {png}")
    if args.results:
        cmd = "python benchmarks/robustness.py " + " ".join(sys.argv[1:])
        section = (f"## Certified vs empirical robustness\n\n{provenance()}. Command: `{cmd.strip()}` "
                   f"({args.steps} training steps per model, one thread; {args.windows} evenly spaced validation "
                   f"windows of {cfg.seq_len()} tokens; attack: {args.steps_attack} steps × 2 restarts on the margin; "
                   f"probe: {args.probe_windows} windows).\n\n```\n{table}\n```\n\n"
                   f"![robustness]({Path(args.png).name})\n")
        write_section(ROOT / args.results, "## Certified vs empirical robustness", section)


if __name__ == "__main__":
    main()

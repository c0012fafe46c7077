"""What the certificate buys: certified vs empirical robust accuracy, for two suites of models.

`--suite constraints` (the default) trains three models of the 128×4 size (context 128) for the
same number of steps: the soft-cap recipe (σmax 3), a tightly certified one (hard cap with a
target bound of 10) and an unconstrained AdamW baseline (no caps, no embedding cap).
`--suite temperature` trains the one-layer Shakespeare recipe certified ≤ 10
(`configs/shakespeare-one-layer.yaml`) with the cross-entropy on τ·logits for τ = 1, 3, 10, the
same recipe with two layers certified ≤ 100, and that two-layer model's caps with the head's cap
and rate divided by 10 under τ = 10 (what `configs/shakespeare.yaml` trains): certified ≤ 10 after
every step, and the same function as the ≤ 100 model up to the factor 10
(docs/frontier.md#the-logits-scale-what-accuracy-at-a-bound-does-not-say).

Runs are reused when OUT/NAME/model.safetensors exists, evaluations when OUT/NAME/robustness.json
holds the same settings. For each model: clean accuracy, the certified bound of embeddings →
logits, the certificate's looseness (bound over the largest ratio the probe finds), certified
and empirical robust accuracy at several ε, and the median certified radius, as a table, a PNG
and a section of benchmarks/RESULTS.md.

    python benchmarks/robustness.py                      # packaged plays, 300 steps each
    python benchmarks/robustness.py --text PATH --steps 600 --windows 64
    python benchmarks/robustness.py --suite temperature --text tinyshakespeare.txt --windows 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from common import ROOT, final, metrics, provenance, table, train, write_section

from distlip.checkpoint.state import open_model
from distlip.config import load_config
from distlip.lipschitz.budget import allocate
from distlip.robustness_report import Robustness, evaluate, format_table, plot, probe, validation_windows

SHAKESPEARE = "configs/shakespeare-one-layer.yaml"
TWO_LAYERS_100 = ["model.n_layers=2", "constraint.target_bound=100"]


def tempered_two_layers(tau: float) -> list[str]:
    """The two-layer ≤ 100 model's caps with the head's cap and Muon rate divided by τ, trained
    on τ·logits: the same training as that model, certified τ times lower."""
    cfg = load_config(ROOT / SHAKESPEARE, TWO_LAYERS_100)
    caps = allocate(cfg)
    caps["head"] /= tau
    return ["model.n_layers=2", "constraint.target_bound=0",
            "constraint.caps={" + ", ".join(f"{g}: {c!r}" for g, c in caps.items()) + "}",
            f"train.loss_temperature={tau:g}", f"optim.lr_mult.head={cfg.optim.lr_mult['head'] / tau!r}"]


def suite(name: str, adamw_lr: float) -> tuple[str, list[tuple[str, str, str, list[str]]], str, str]:
    """(config, [(model, run directory, label, overrides)], RESULTS section title, default PNG)."""
    if name == "constraints":
        models = [
            ("default", "default", "default (soft cap σ 3)", ["constraint.method=soft_cap", "constraint.sigma_max=3"]),
            ("tight", "tight", "tight (hard cap, target bound 10)",
             ["constraint.method=hard_cap", "constraint.target_bound=10", "optim.lr=2"]),
            ("adamw", f"adamw-lr{adamw_lr:g}", f"unconstrained (AdamW {adamw_lr:g})",
             ["constraint.method=none", "constraint.embed_cap=false", "optim.name=adamw", "optim.lr_mult={}",
              f"optim.lr={adamw_lr:g}"]),
        ]
        return "configs/soft-cap.yaml", models, "## Certified vs empirical robustness", "benchmarks/robustness.png"
    models = [
        ("tau1", "tau1", "≤ 10, τ 1 (one layer)", []),
        ("tau3", "tau3", "≤ 10, τ 3", ["train.loss_temperature=3"]),
        ("tau10", "tau10", "≤ 10, τ 10", ["train.loss_temperature=10"]),
        ("two-layers-100", "two-layers-100", "2 layers ≤ 100, τ 1", TWO_LAYERS_100),
        ("two-layers-10-tau10", "two-layers-10-tau10", "2 layers ≤ 10, τ 10 (head ÷ 10)", tempered_two_layers(10.0)),
    ]
    return (SHAKESPEARE, models, "## The logits' scale: accuracy, certified radius and the loss temperature",
            "benchmarks/robustness_temperature.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["constraints", "temperature"], default="constraints")
    ap.add_argument("--out", default=None, help="run directories (default: runs/robustness[-SUITE])")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--text", default=None, help="train on this text file instead of the packaged plays")
    ap.add_argument("--models", nargs="+", default=None, help="the suite's models to include (default: all)")
    ap.add_argument("--adamw-lr", type=float, default=0.003, help="the unconstrained baseline's learning rate")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--windows", type=int, default=32, help="validation windows evaluated per model")
    ap.add_argument("--probe-windows", type=int, default=2)
    ap.add_argument("--steps-attack", type=int, default=10)
    ap.add_argument("--png", default=None, help="plot path (default: the suite's)")
    ap.add_argument("--results", default="benchmarks/RESULTS.md", help="'' to skip writing it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config, models, title, png_default = suite(args.suite, args.adamw_lr)
    chosen = [m for m in models if args.models is None or m[0] in args.models]
    if not chosen:
        sys.exit(f"--models {' '.join(args.models)} names no model of suite {args.suite}; "
                 f"choose from {' '.join(m[0] for m in models)}")
    out = ROOT / (args.out or ("runs/robustness" if args.suite == "constraints" else f"runs/robustness-{args.suite}"))
    data = ["data.source=text", f"data.path={args.text}"] if args.text else []
    results, whole = [], []
    for _, name, label, overrides in chosen:
        run = out / name
        if not (run / "model.safetensors").is_file():
            print(f"training {run.name} ({args.steps} steps) ...", flush=True)
            train(run, config, [f"train.steps={args.steps}", "train.threads=1", "train.eval_every=0", *data,
                                *overrides])
        end = final(metrics(run))
        whole.append({"model": label, "acc": 100 * end["val_acc"], "loss": end["val_loss"],
                      "bound": end["lipschitz_bound"]})
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
    summary = table(whole, [("model", "{}"), ("acc", "{:.2f}"), ("loss", "{:.4f}"), ("bound", "{:.4g}")])
    report = format_table(results)
    print(summary, report, sep="\n\n")
    png_path = args.png or png_default
    png = plot(results, ROOT / png_path)
    print(f"plot: {png}")
    if args.results:
        cmd = "python benchmarks/robustness.py " + " ".join(sys.argv[1:])
        section = (f"{title}\n\n{provenance()}. Command: `{cmd.strip()}` "
                   f"({args.steps} training steps per model, one thread; {args.windows} evenly spaced validation "
                   f"windows of {cfg.seq_len()} tokens; attack: {args.steps_attack} steps × 2 restarts on the margin; "
                   f"probe: {args.probe_windows} windows). Whole validation split at the end of training "
                   f"(accuracy %, loss of the model's own logits, certified bound):\n\n{summary}\n\n"
                   f"```\n{report}\n```\n\n"
                   f"![robustness]({Path(png_path).name})\n")
        write_section(ROOT / args.results, title, section)


if __name__ == "__main__":
    main()

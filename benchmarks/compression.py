"""Compressed communication (docs/compression.md#formulas) on 2-process Shakespeare training: bytes, time, loss.

Every method trains the same small model (`configs/compression-bench.yaml`: d 64, 2 layers, context
64, batch 32, Muon with the soft cap at σmax 2, colnorm embedding so every tensor goes through the
exchange) for the same number of steps with `distlip train` under torchrun (gloo). Per method:
uplink and downlink bytes per rank per compressed step and their cumulative totals, ms per step
spent compressing / decompressing (exchange time outside collectives) and inside collectives, final
validation loss on the whole held-out split. Writes a loss-vs-cumulative-uplink-bytes plot (periodic
points on 256 validation windows, the last on the whole split).

One row sends nothing: one process trained on one rank's share of the batch. A compressed method
has carried something of the other rank's data only where it ends below that row.

`--slow-link` (root) instead times dense against 1% compression as a real 2-node job across
two network namespaces joined by a rate-limited veth (`benchmarks/slow_link.py`).

    python benchmarks/compression.py [--steps 300] [--set model.d_model=256 ...] [--results benchmarks/RESULTS.md]
    python benchmarks/compression.py --slow-link [--rate 100mbit] [--steps 100] [--results ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import ROOT, final, provenance, table, train
from slow_link import slow_link, train_two_nodes

from distlip.config import load_config

CONFIG = "configs/compression-bench.yaml"  # the small model shared with compression_scale.py and the tests
WARMUP = ["compression.warmup_steps=2"]  # two dense steps initialise the estimators


def method(compressor: str, estimator: str, ratio: float, *extra: str) -> list[str]:
    return [f"compression.compressor={compressor}", f"compression.estimator={estimator}",
            f"compression.ratio={ratio}", *extra]


EF21_MOMENTUM = "compression.ef21_eta=0.1"  # EF21 compresses the momentum (β = 0.9); Muon adds none
SENT_SLOW = "compression.ef21_eta_sent=0.01"  # the shares sent compressed follow a slower momentum
METHODS = {
    "dense": ["compression.estimator=dense"],
    # The exchange at ratio 1.0 is dense, but the shares sent follow η 0.01: what two momenta do without compression.
    "dense, two momenta (ef21 ratio 1.0, η_sent 0.01)": method("topk", "ef21", 1.0, EF21_MOMENTUM, SENT_SLOW),
    "topk 10% + ef21": method("topk", "ef21", 0.1, EF21_MOMENTUM, SENT_SLOW),
    "topk 1% + ef21": method("topk", "ef21", 0.01, EF21_MOMENTUM, SENT_SLOW),
    "topk 1% + ef21, one η (0.1)": method("topk", "ef21", 0.01, EF21_MOMENTUM),
    "topk 1% + ef21, one η, own share compressed": method("topk", "ef21", 0.01, EF21_MOMENTUM,
                                                          "compression.exact_own=false"),
    "topk 1% + ef21, downlink topk 1%": method("topk", "ef21", 0.01, EF21_MOMENTUM, SENT_SLOW,
                                               "compression.downlink=topk", "compression.downlink_ratio=0.01"),
    "topk 1% + ef14": method("topk", "ef14", 0.01),
    "randk 10% + diana": method("randk", "diana", 0.1),
    "randk 1% + diana": method("randk", "diana", 0.01),
    "randk 1% + marina": method("randk", "marina", 0.01),  # on one batch: two backward passes per step
    "randk 1% + marina, p 0.3": method("randk", "marina", 0.01, "compression.marina_p=0.3"),
    "randk 1% + marina, one pass": method("randk", "marina", 0.01, "compression.marina_same_batch=false"),
    "randk 1% + plain (allow_plain)": method("randk", "plain", 0.01, "compression.allow_plain=true"),
}
ALONE = "one rank alone (half the batch, nothing sent)"  # one process, no compression keys
ALL_ROWS = [*METHODS, ALONE]
SLOW_LINK_METHODS = ["dense", "topk 1% + ef21", "topk 1% + ef21, downlink topk 1%"]
SLOW_LINK_COLUMNS = [("method", "{}"), ("uplink B/step", "{:,.0f}"), ("downlink B/step", "{:,.0f}"),
                     ("comm ms/step", "{:.1f}"), ("step ms", "{:.1f}"), ("tokens/s", "{:,.0f}")]
COLUMNS = [("method", "{}"), ("uplink B/step", "{:,.0f}"), ("downlink B/step", "{:,.0f}"),
           ("uplink total MB", "{:.2f}"), ("uplink ÷", "{:.1f}"), ("codec ms/step", "{:.2f}"),
           ("collective ms/step", "{:.1f}"), ("step ms", "{:.1f}"), ("val loss", "{:.4f}")]


def half_batch(overrides: list[str]) -> int:
    """One rank's share of the 2-process batch that `overrides` (`--set` included) configure."""
    return load_config(ROOT / CONFIG, overrides).train.batch_size // 2


def step_ms(record: dict) -> float:
    """Wall ms per step from the trainer's phase timer (the exchange's own split excluded)."""
    return sum(v for k, v in record.items() if k.startswith("ms_") and k not in ("ms_codec", "ms_collective"))


def summarise(name: str, records: list[dict]) -> tuple[dict, list[tuple[float, float]]]:
    """One table row, and the (cumulative uplink bytes, val loss) curve from the periodic evaluations."""
    logs = [r for r in records if "uplink_bytes_total" in r]
    steady = logs[1:] or logs  # the first record's window holds the dense warm-up steps
    mean = lambda key: sum(r[key] for r in steady) / len(steady)  # noqa: E731
    totals = {r["step"]: r["uplink_bytes_total"] for r in logs}
    curve = [(totals[r["step"]], r["val_loss"]) for r in records if "val_loss" in r and r["step"] in totals]
    end = final(records)
    curve.append((logs[-1]["uplink_bytes_total"], end["val_loss"]))
    row = {"method": name, "uplink B/step": mean("uplink_bytes"), "downlink B/step": mean("downlink_bytes"),
           "uplink total MB": logs[-1]["uplink_bytes_total"] / 1e6, "codec ms/step": mean("ms_codec"),
           "collective ms/step": mean("ms_collective"), "step ms": sum(map(step_ms, steady)) / len(steady),
           "val loss": end["val_loss"], "certified": end["certified"]}
    return row, curve


def plot(curves: dict[str, list[tuple[float, float]]], alone: float | None, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.tab20.colors[0::2] + plt.cm.tab20.colors[1::2]  # strong shades first, then the light ones
    for i, (name, points) in enumerate(curves.items()):
        xs, ys = zip(*points)
        color = "black" if name == "dense" else colors[i % len(colors)]
        ax.plot(xs, ys, marker="o", markersize=3, color=color, label=name)
    if alone is not None:
        ax.axhline(alone, color="gray", linestyle=":", label=f"{ALONE}: final")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes per rank")
    ax.set_ylabel("validation loss")
    ax.set_title(f"2-process Shakespeare, {steps} steps: loss vs gradient bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", nargs="*", default=ALL_ROWS, help="a subset of the method names")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every run, e.g. model.d_model=256")
    ap.add_argument("--text", required=True, help="benchmark text, e.g. the char-rnn tinyshakespeare.txt")
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "compression_loss_vs_bytes.png"))
    ap.add_argument("--results", default="", help="append the table to this markdown file")
    ap.add_argument("--slow-link", action="store_true", help="time dense vs 1%% as 2 nodes over a shaped veth (root)")
    ap.add_argument("--rate", default="100mbit", help="--slow-link bandwidth (tc tbf rate)")
    args = ap.parse_args()
    if not Path(args.text).is_file():
        raise SystemExit(f"benchmark text {args.text} not found; pass --text PATH")

    every = max(args.steps // 6, 10)
    base = WARMUP + ["data.source=text", f"data.path={args.text}", f"train.steps={args.steps}", "train.log_every=10",
                    f"train.eval_every={every - every % 10}", "train.eval_windows=256", *args.set]
    if args.slow_link:
        time_slow_link(args, base)
        return
    rows, curves, alone = [], {}, None
    for i, name in enumerate(args.methods):
        with tempfile.TemporaryDirectory() as tmp:
            if name == ALONE:
                records = train(Path(tmp) / "run", CONFIG,
                                base + [f"train.batch_size={half_batch(base)}"], nproc=1)
                end = final(records)
                alone = end["val_loss"]
                rows.append({"method": name, "val loss": alone, "certified": end["certified"]})
            else:
                records = train(Path(tmp) / "run", CONFIG, base + METHODS[name], nproc=2,
                                port=29700 + i)
                row, curves[name] = summarise(name, records)
                rows.append(row)
        print(f"{name}: val loss {rows[-1]['val loss']:.4f}", flush=True)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for r in rows:
        r["uplink ÷"] = dense["uplink total MB"] / r["uplink total MB"] if dense and "uplink total MB" in r else None
    text = table(rows, COLUMNS)
    print(text)
    plot(curves, alone, Path(args.plot), args.steps)
    if args.results:
        append_results(Path(args.results), text, args)


def time_slow_link(args: argparse.Namespace, base: list[str]) -> None:
    """Step time of dense vs 1% compression as a real 2-node job over a `--rate` link."""
    rows = []
    with slow_link(args.rate):
        for name in SLOW_LINK_METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                records = train_two_nodes(Path(tmp) / "run", CONFIG, base + METHODS[name])
            steady = [r for r in records if "uplink_bytes_total" in r][1:]
            mean = lambda key, steady=steady: sum(r[key] for r in steady) / len(steady)  # noqa: E731
            rows.append({"method": name, "uplink B/step": mean("uplink_bytes"),
                         "downlink B/step": mean("downlink_bytes"),
                         "comm ms/step": mean("ms_comm"), "step ms": sum(map(step_ms, steady)) / len(steady),
                         "tokens/s": mean("tokens_per_s")})
            print(f"{name}: {rows[-1]['step ms']:.1f} ms/step", flush=True)
    text = table(rows, SLOW_LINK_COLUMNS)
    print(text)
    if args.results:
        command = f"python benchmarks/compression.py --slow-link --rate {args.rate} --steps {args.steps}"
        with Path(args.results).open("a") as f:
            f.write(f"""
### Over a {args.rate} link

Command: `{command} --results {args.results}`. The same model as above as a real 2-node torchrun
job, one process per node, in two network namespaces joined by a veth shaped with `tc tbf rate
{args.rate}` on both ends (gloo bound to the veth). Times are means over the logged windows after
the first (warm-up) one; "comm" is the step's exchange phases.

{text}
""")


def shown(path: Path) -> Path:
    """`path` relative to the repository where it lies inside it."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def append_results(path: Path, text: str, args: argparse.Namespace) -> None:
    command = f"python benchmarks/compression.py --steps {args.steps}"
    if args.methods != ALL_ROWS:
        command += " --methods " + " ".join(f"'{m}'" for m in args.methods)
    if args.set:
        command += " --set " + " ".join(args.set)
    command += f" --results {args.results}"
    overridden = "Overridden for every row: " + ", ".join(args.set) + ". " if args.set else ""
    section = f"""
## Compression

{provenance()}, 2 processes
over gloo on one host, shared with other jobs (times are indicative). Command: `{command}`.
Model: d 64, 2 layers, 4 heads, context 64, batch 32 (two ranks × 16), {args.steps} steps, Muon lr 0.5 decayed
linearly to 0, soft cap σmax 2, colnorm embedding; tinyshakespeare, validation loss on the whole held-out
10%. Bytes are per rank per step after the 2 dense warm-up steps, the busier of sent/received. The uplink
is one bucketed exchange to the tensors' owners per step: a ring reduce-scatter ((M−1)·chunk, chunk = the
busiest owner's share) of dense and shared-mask values, an all-to-all of Top-k (values, int32 indices); the
downlink is one broadcast per owner (n). "uplink ÷" is dense's cumulative uplink bytes over the method's
(warm-up included). Codec time is the exchange's time outside collectives (compress, decompress,
estimator arithmetic). {overridden}Plot: `{shown(Path(args.plot))}`.

{text}
"""
    with path.open("a") as f:
        f.write(section)


if __name__ == "__main__":
    main()

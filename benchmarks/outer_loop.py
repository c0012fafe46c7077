"""The local-step outer loop (docs/compression.md#the-outer-loop) against per-step dense training, 2 processes:
final validation loss, total bytes per rank, and each rank's optimiser time.

Every row trains the default config's model (d 128, 4 layers, 4 heads, context 128, batch 32 split over
two ranks, Muon with the soft cap at σmax 3) on the packaged Shakespeare plays, with the colnorm embedding
(the outer loop refuses DeepSpeed's), for the same steps, so on the same tokens. Rows: dense per-step
training (`compression.estimator=dense`, which counts its bytes and trains bit for bit like compression
off), then `compression.sync_every` H for each `--every` with dense pseudo-gradients and with each
`--topk` ratio (Top-k + EF14 on the pseudo-gradient). Outer step: `--outer-lr`, `--outer-momentum`.

Bytes: per rank, the busier of sent and received, summed over the run (uplink + downlink; the outer loop
has no downlink). Optimiser and constraint seconds: per rank, summed over the run (the trainer's phase
timer, averaged over ranks): under per-step training each rank steps the matrices it owns, in the outer
loop every rank steps all of them.

    python benchmarks/outer_loop.py [--steps 300] [--every 8 16 32] [--topk 0.01] [--set key=value ...]
                                    [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import final, provenance, table, train, write_section

CONFIG = "configs/soft-cap.yaml"
MODEL = ["optim.embed=colnorm", "train.threads=1", "train.log_every=10", "train.eval_every=0",
         "train.certify_every=10", "compression.warmup_steps=0"]
COLUMNS = [("method", "{}"), ("H", "{}"), ("bytes/rank MB", "{:.2f}"), ("÷ dense", "{:.1f}"),
           ("optimizer s/rank", "{:.1f}"), ("constraint s/rank", "{:.1f}"), ("val loss", "{:.4f}"),
           ("gap", "{:+.2%}"), ("certified", "{}")]


def rows_to_run(every: list[int], topk: list[float], lr: float, momentum: float) -> dict[str, list[str]]:
    outer = [f"compression.outer_lr={lr}", f"compression.outer_momentum={momentum}"]
    runs = {"dense per step": ["compression.estimator=dense"]}
    for h in every:
        runs[f"outer H={h}, dense Δ"] = [f"compression.sync_every={h}", *outer]
        for ratio in topk:
            runs[f"outer H={h}, topk {ratio:g} + ef14 Δ"] = [
                f"compression.sync_every={h}", *outer, "compression.compressor=topk", f"compression.ratio={ratio}",
                "compression.estimator=ef14"]
    return runs


def seconds(records: list[dict], key: str) -> float:
    """A phase's seconds per rank over the run: each logged window's ms per step times its steps."""
    logs = [r for r in records if "tokens_per_s" in r]
    total, last = 0.0, 0
    for r in logs:
        total += r.get(key, 0.0) * (r["step"] - last) / 1000
        last = r["step"]
    return total


def summarise(name: str, overrides: list[str], records: list[dict]) -> dict:
    logs = [r for r in records if "uplink_bytes_total" in r]
    end = final(records)
    h = next((o.split("=")[1] for o in overrides if o.startswith("compression.sync_every=")), "1")
    return {"method": name, "H": h,
            "bytes/rank MB": (logs[-1]["uplink_bytes_total"] + logs[-1]["downlink_bytes_total"]) / 1e6,
            "optimizer s/rank": seconds(records, "ms_optimizer"),
            "constraint s/rank": seconds(records, "ms_constraint"),
            "val loss": end["val_loss"], "certified": end["certified"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, nargs="*", default=[8, 16, 32], help="H values of the outer loop")
    ap.add_argument("--topk", type=float, nargs="*", default=[0.01], help="Top-k ratios of the pseudo-gradient")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    ap.add_argument("--results", default="", help="write the table into this markdown file")
    args = ap.parse_args()

    base = MODEL + [f"train.steps={args.steps}", *args.set]
    rows = []
    for i, (name, overrides) in enumerate(rows_to_run(args.every, args.topk, args.outer_lr,
                                                      args.outer_momentum).items()):
        with tempfile.TemporaryDirectory() as tmp:
            records = train(Path(tmp) / "run", CONFIG, base + overrides, nproc=2, port=29800 + i)
        rows.append(summarise(name, overrides, records))
        print(f"{name}: val loss {rows[-1]['val loss']:.4f}, {rows[-1]['bytes/rank MB']:.2f} MB/rank", flush=True)
    dense = rows[0]
    for r in rows:
        r["÷ dense"] = dense["bytes/rank MB"] / r["bytes/rank MB"]
        r["gap"] = r["val loss"] / dense["val loss"] - 1
    text = table(rows, COLUMNS)
    print(text)
    if args.results:
        command = (f"python benchmarks/outer_loop.py --steps {args.steps} --every {' '.join(map(str, args.every))} "
                   f"--topk {' '.join(map(str, args.topk))} --outer-lr {args.outer_lr} "
                   f"--outer-momentum {args.outer_momentum}" + (f" --set {' '.join(args.set)}" if args.set else "")
                   + f" --results {args.results}")
        write_section(Path(args.results), "## Outer loop", f"""## Outer loop

{provenance()}, 2 processes over gloo on one host, shared with other jobs (seconds are indicative).
Command: `{command}`. The default config's model with the colnorm embedding, {args.steps} steps of batch 32
(16 per rank), the same tokens in every row; validation loss on the whole held-out split, "gap" against
dense per-step training. Bytes: per rank, the busier of sent/received, summed over the run: for dense, the
per-step reduce-scatter of gradients to their owners and the owners' broadcasts of the new weights; for
the outer loop, one all-reduce (dense Δ) or all-gather (Top-k values and int32 indices) of
pseudo-gradients per round, nothing else. Optimiser and constraint seconds: per rank, summed over the
run; per-step training steps each matrix on its owner only, the outer loop on every rank.

{text}
""")


if __name__ == "__main__":
    main()

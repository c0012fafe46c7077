"""Where a training step's time goes: forward, backward, communication, optimiser, constraint,
certificate; tokens/s, model FLOPs utilisation and peak memory.

CPU (default): the Shakespeare preset on 1 vs 2 processes.
GPU: `--preset configs/nanogpt-145m.yaml --device cuda --dtype bfloat16` on one GPU.

    python benchmarks/step_breakdown.py [--steps 30] [--nproc 1 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import last_step, table, train

PHASES = ("data", "forward", "backward", "comm", "optimizer", "constraint", "certificate")


def mfu(record: dict, n_params: int, cfg: dict, peak_tflops: float) -> float:
    """Achieved / peak FLOP/s with 6·N per token (N excludes the embedding lookup) plus causal
    attention's 6·L·d·T per token."""
    m = cfg["model"]
    flops_per_token = 6 * n_params + 6 * m["n_layers"] * m["d_model"] * m["context"]
    return record["tokens_per_s"] * flops_per_token / (peak_tflops * 1e12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="configs/shakespeare-paper.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = ap.parse_args()

    rows = []
    for nproc in args.nproc:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            overrides = [f"train.steps={args.steps}", f"train.log_every={max(args.steps // 2, 1)}",
                         "train.eval_every=0",
                         f"train.device={args.device}", f"train.dtype={args.dtype}", *args.set]
            if args.device == "cpu":
                overrides.append(f"train.threads={max(2 // nproc, 1)}")
            records = train(out, args.preset, overrides, nproc=nproc)
            cfg = json.loads((out / "config.json").read_text())["config"]
            rec = last_step(records)
            start = records[0]
            embed = cfg["model"]["vocab_size"] * cfg["model"]["d_model"]
            step_ms = sum(rec[f"ms_{p}"] for p in PHASES)
            rows.append({
                "processes": nproc, "tokens_per_s": rec["tokens_per_s"], "step_ms": step_ms,
                **{p: rec[f"ms_{p}"] for p in PHASES},
                "constraint+cert %": 100 * (rec["ms_constraint"] + rec["ms_certificate"]) / step_ms,
                "MFU %": (100 * mfu(rec, start["params"] - embed, cfg, args.peak_tflops)
                          if args.device == "cuda" else None),
                "peak_mem_GiB": rec.get("peak_mem_gib"),
            })
    cols = [("processes", "{}"), ("tokens_per_s", "{:,.0f}"), ("step_ms", "{:.1f}")] + \
           [(p, "{:.1f}") for p in PHASES] + [("constraint+cert %", "{:.1f}"), ("MFU %", "{:.1f}"),
                                              ("peak_mem_GiB", "{:.2f}")]
    print(f"preset {args.preset}, {args.steps} steps, device {args.device}, dtype {args.dtype}; times in ms per step")
    print(table(rows, cols))


if __name__ == "__main__":
    main()

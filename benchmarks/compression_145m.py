"""Compress + communicate one step of the 145M model's gradients: 1% against dense (docs/compression.md#formulas).

The tensors are those distlip exchanges for `--preset` (every matrix, 123.6M fp32 coordinates
for configs/nanogpt-145m.yaml; its embedding belongs to DeepSpeed), owned as the engine owns
them. Gradients are random (the cost of Top-k, Rand-k masks and the collectives does not depend
on their values), different on every rank and every step. Per method: bytes per rank per step,
ms in the codec (compress, decompress, estimator arithmetic) and in collectives, and the total,
averaged over `--steps` steps after the dense warm-up. Launches itself under torchrun: gloo on
CPU, NCCL on GPUs (one per process).

    python benchmarks/compression_145m.py [--nproc 2] [--device cpu|cuda] [--steps 5] [--results benchmarks/RESULTS.md]
    python benchmarks/compression_145m.py --slow-link 1gbit ...   # 2 nodes over a shaped veth (root)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, provenance, table, write_section  # noqa: E402
from slow_link import slow_link, two_nodes  # noqa: E402

WARMUP = 2
METHODS = {
    "dense": ("identity", "dense", 1.0, "identity"),
    "topk 1% + ef21": ("topk", "ef21", 0.01, "identity"),
    "topk 1% + ef14": ("topk", "ef14", 0.01, "identity"),
    "randk 1% + diana (shared mask)": ("randk", "diana", 0.01, "identity"),
    "topk 1% + ef21, downlink topk 1%": ("topk", "ef21", 0.01, "topk"),
}
COLUMNS = [("method", "{}"), ("uplink MB/step", "{:.2f}"), ("downlink MB/step", "{:.2f}"),
           ("codec ms", "{:.0f}"), ("collective ms", "{:.0f}"), ("total ms", "{:.0f}"), ("vs dense", "{:.2f}")]


def shapes(preset: str) -> dict[str, torch.Size]:
    """The shapes of the tensors distlip exchanges for `preset`, in model order (no memory used)."""
    from distlip.config import load_config
    from distlip.model import LipschitzTransformer, matrix_names

    cfg = load_config(preset, [])
    if not cfg.model.vocab_size:
        raise SystemExit(f"--preset {preset} sets no model.vocab_size (its tokenizer decides it): "
                         "pass a preset that fixes it, e.g. configs/nanogpt-145m.yaml")
    with torch.device("meta"):
        model = LipschitzTransformer(cfg.model)
    params = dict(model.named_parameters())
    names = matrix_names(model) + (["embed.weight"] if cfg.optim.embed == "colnorm" else [])
    return {n: params[n].shape for n in names}


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    from distlip.compress import ByteCounter, TorchComm, build, check
    from distlip.config import CompressionConfig
    from distlip.compress.accounting import DOWNLINK, broadcast_bytes
    from distlip.distributed.env import exit_process
    from distlip.distributed.exchange import TimedComm
    from distlip.distributed.sharding import plan_ownership

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    sizes = shapes(args.preset)
    plan = plan_ownership({n: s.numel() for n, s in sizes.items()}, world)
    gen = torch.Generator(device=device).manual_seed(rank)
    # Two gradient sets, alternated, so that v − u never vanishes for the error-feedback methods.
    grads = [{n: torch.randn(s, generator=gen, device=device) for n, s in sizes.items()} for _ in range(2)]
    weights = {n: torch.zeros(s, device=device) for n, s in sizes.items()}
    masters = {n: torch.randn(sizes[n], generator=gen, device=device) for n in plan.owned_by(rank)}
    rows = []
    for name, (compressor, estimator, ratio, downlink) in METHODS.items():
        counter = ByteCounter()
        comm = TimedComm(TorchComm())
        section = dict(compressor=compressor, estimator=estimator, ratio=ratio, warmup_steps=WARMUP,
                       downlink=downlink, downlink_ratio=ratio if downlink != "identity" else 1.0)
        section = CompressionConfig(**section)
        check(section)
        uplink, down = build(section, comm, counter)
        totals = [0.0, 0.0]  # all seconds, collective seconds
        for step in range(WARMUP + args.steps):
            if step == WARMUP:
                counter.reset()
                totals = [0.0, 0.0]
                comm.seconds = 0.0
            sync()
            start = time.perf_counter()
            uplink.aggregate_many(grads[step % 2], step=step, owners=plan.owner)
            if down is not None:
                for n, x in masters.items():
                    x.add_(grads[step % 2][n], alpha=1e-3)  # the owners' new masters
                down.sync_many({n: (weights[n], masters.get(n), o) for n, o in plan.owner.items()}, step=step)
            else:  # the engine's dense path: each owner broadcasts its tensors in one flat buffer
                for owner in range(world):
                    names = plan.owned_by(owner)
                    flat = torch.cat([(masters[n] if owner == rank else weights[n]).reshape(-1) for n in names])
                    comm.broadcast(flat, owner)
                    sent, received = broadcast_bytes(flat.nbytes, world, owner == rank)
                    counter.add(DOWNLINK, sent=sent, received=received, dense_sent=sent, dense_received=received)
            sync()
            totals[0] += time.perf_counter() - start
        totals[1] = comm.seconds
        stats = torch.tensor([counter.uplink_bytes, counter.downlink_bytes, *totals], dtype=torch.float64,
                             device=device)
        dist.all_reduce(stats)  # averages over ranks
        up, downb, total, coll = (stats / world / args.steps).tolist()
        rows.append({"method": name, "uplink MB/step": up / 1e6, "downlink MB/step": downb / 1e6,
                     "codec ms": 1e3 * (total - coll), "collective ms": 1e3 * coll, "total ms": 1e3 * total})
        del uplink, down
    if rank == 0:
        for r in rows:
            r["vs dense"] = r["total ms"] / rows[0]["total ms"]
        text = table(rows, COLUMNS)
        print(text, flush=True)
        if args.results:
            n = sum(s.numel() for s in sizes.values())
            where = f"2 nodes over {args.slow_link}" if args.slow_link else args.device
            launch = f"--slow-link {args.slow_link}" if args.slow_link else f"--nproc {world} --device {args.device}"
            command = (f"python benchmarks/compression_145m.py {launch} --steps {args.steps} "
                       "--results benchmarks/RESULTS.md")
            heading = f"## Compression of the 145M model's gradients ({where})"
            write_section(Path(args.results), heading, f"""{heading}

{provenance()}.
Command: `{command}`. {len(sizes)} tensors, {n / 1e6:.1f}M fp32 coordinates
({Path(args.preset).name}), {world} processes, owner-computes ownership; random gradients; per rank per step,
averaged over {args.steps} steps after {WARMUP} dense ones and over ranks. Uplink: one bucketed exchange to the
owners; downlink: one broadcast per owner (dense rows: the engine's flat broadcast of the new weights).
"vs dense": total time over dense's.

{text}
""")
    exit_process(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=str(ROOT / "configs" / "nanogpt-145m.yaml"))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--results", default="", help="write the table into this markdown file")
    ap.add_argument("--slow-link", default="", metavar="RATE",
                    help="run as 2 nodes (one process each) joined by a veth shaped to RATE, e.g. 1gbit (root)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    shapes(args.preset)  # a bad preset fails here, in one line, before any process starts
    if args.device == "cuda" and args.nproc > torch.cuda.device_count():
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs (NCCL allows one process per GPU), "
                         f"{torch.cuda.device_count()} visible: lower --nproc (1 times the codec alone)")
    # Spelled out rather than passed through: torchrun's own parser would take `--nproc` for an
    # ambiguous prefix of its options. The workers run elsewhere (the slow link's from the
    # repository root), hence the absolute paths.
    worker_args = [str(Path(__file__).resolve()), "--worker", "--preset", str(Path(args.preset).resolve()),
                   "--device", args.device, "--steps", str(args.steps)]
    if args.slow_link:
        worker_args += ["--slow-link", args.slow_link]
    if args.results:
        worker_args += ["--results", str(Path(args.results).resolve())]
    if args.slow_link:
        with slow_link(args.slow_link):
            print(two_nodes(worker_args, timeout=1800)[0])
        return
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), *worker_args]
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()

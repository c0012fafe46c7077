"""Time every weight constraint against one Muon Newton–Schulz step (docs/method.md#constraints, #muon).

Matrices are those of the 145M model (docs/method.md#architecture): per layer W_q, W_k, W_v, W_o
(768×768), MLP in (3072×768) and out (768×3072); the head (50304×768). Each method runs
through ``Constrainer.apply_many`` exactly as training calls it (same-shape matrices
batched, power-iteration vectors already warm); Newton–Schulz runs on the same batches.
``--layers N`` times N layers and scales the block time by 12/N; the head is timed as is.

    python benchmarks/constraints.py --layers 1                       # CPU, a few minutes
    python benchmarks/constraints.py --device cuda --dtype bfloat16   # all 12 layers
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from distlip.config.choices import METHODS
from distlip.lipschitz.constrainer import Constrainer
from distlip.lipschitz.newton_schulz import NS_MAX_GAIN, orthogonalize
from distlip.lipschitz.spectral import rms_scale

D_MODEL, D_MLP, N_LAYERS, HEAD_ROWS = 768, 3072, 12, 50304
HIDDEN_LR, HEAD_LR, SAFETY = 0.05, 0.005, 1.05  # learning rates of docs/method.md#reference-results


def _semi_orthogonal(d_out: int, d_in: int, gen: torch.Generator) -> torch.Tensor:
    """(d_out, d_in) matrix with every singular value 1 in RMS→RMS units."""
    q, _ = torch.linalg.qr(torch.randn(max(d_out, d_in), min(d_out, d_in), generator=gen))
    return (q if d_out >= d_in else q.T) * rms_scale((d_out, d_in))


def model_matrices(layers: int, seed: int = 0) -> tuple[dict, dict]:
    """(blocks, head): named float32 CPU matrices at the cap plus one step of norm lr·gain."""
    gen = torch.Generator().manual_seed(seed)
    step = HIDDEN_LR * NS_MAX_GAIN

    def after_step(d_out: int, d_in: int, size: float) -> torch.Tensor:
        return _semi_orthogonal(d_out, d_in, gen) + size * _semi_orthogonal(d_out, d_in, gen)

    blocks = {}
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            blocks[f"h.{i}.attn.{name}"] = after_step(D_MODEL, D_MODEL, step)
        blocks[f"h.{i}.mlp.in"] = after_step(D_MLP, D_MODEL, step)
        blocks[f"h.{i}.mlp.out"] = after_step(D_MODEL, D_MLP, step)
    head = {"head": after_step(HEAD_ROWS, D_MODEL, HEAD_LR * NS_MAX_GAIN)}
    return blocks, head


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Fastest of ``repeats`` calls of fn, in milliseconds (robust to other jobs' load)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def newton_schulz(named: dict[str, torch.Tensor]) -> None:
    """One Muon orthogonalisation of every matrix, batched by shape."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for W in named.values():
        groups.setdefault(tuple(W.shape), []).append(W)
    for mats in groups.values():
        orthogonalize(torch.stack(mats))


def constrainer_for(method: str, warm: dict[str, torch.Tensor]) -> Constrainer:
    """A Constrainer in steady state: its power-iteration vectors already converged."""
    c = Constrainer(
        method,
        1.0,
        weight_decay=0.1 if method == "weight_decay" else 0.0,
        spectral_wd=0.1 if method == "spectral_weight_decay" else 0.0,
    )
    c.load_state_dict(warm)
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=N_LAYERS, help="layers to time (scaled to 12)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default: 0 cpu, 2 cuda)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls, fastest kept (default: 3 cpu, 10 cuda)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS[1:]))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 0)
    repeats = args.repeats if args.repeats is not None else (10 if device.type == "cuda" else 3)

    blocks, head = model_matrices(args.layers)
    blocks = {n: W.to(device, dtype) for n, W in blocks.items()}
    head = {n: W.to(device, dtype) for n, W in head.items()}
    parts = {"blocks": (blocks, HIDDEN_LR), "head": (head, HEAD_LR)}
    primer = Constrainer("spectral_normalize", 1.0)
    for named, lr in parts.values():
        primer.apply_many(named, lr=lr)
    warm = primer.state_dict()

    scale = N_LAYERS / args.layers
    print(f"# {device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.layers} of {N_LAYERS} layers timed (block times ×{scale:g}), "
          f"{warmup} warm-up calls, fastest of {repeats} timed calls")
    rows = [("orthogonalize (Muon NS)", lambda named, lr: newton_schulz(named))]
    for method in args.methods:
        c = constrainer_for(method, warm)
        norms = {n: lr * NS_MAX_GAIN * SAFETY for named, lr in parts.values() for n in named}
        rows.append((method, lambda named, lr, c=c, norms=norms: c.apply_many(named, lr=lr, update_norms=norms)))

    print("| method | blocks ms | head ms | total ms/step | × NS |")
    print("|---|---:|---:|---:|---:|")
    ns_total = None
    for label, fn in rows:
        ms = {part: timed(lambda fn=fn, named=named, lr=lr: fn(named, lr), device, warmup, repeats)
              for part, (named, lr) in parts.items()}
        total = ms["blocks"] * scale + ms["head"]
        ns_total = ns_total or total
        print(f"| {label} | {ms['blocks'] * scale:.1f} | {ms['head']:.1f} | {total:.1f} | "
              f"{total / ns_total:.2f} |", flush=True)


if __name__ == "__main__":
    main()

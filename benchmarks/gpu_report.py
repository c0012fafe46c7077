"""The tables of `benchmarks/gpu.sh`: reads the runs it left in OUT and writes OUT/tables.md and
OUT/report.json. A missing run is reported as missing, not skipped silently.

    python benchmarks/gpu_report.py OUT [--peak-tflops 989] [--nproc 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from step_breakdown import PHASES, mfu

from common import provenance, table

GOAL_TOKENS_PER_S = 420_000  # one H100-class GPU, 145M preset, bf16
GOAL_CONSTRAINT_SHARE = 0.03  # constraint + certificate, of the step
GOAL_MEMORY_ERROR = 0.10  # measured peak against the memory model
FAST_PATH_RTOL = 1e-4  # float32 losses of the fast path against eager, step by step


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_config(run: Path) -> dict | None:
    path = run / "config.json"
    return json.loads(path.read_text())["config"] if path.is_file() else None


def embedded(path: Path) -> str | None:
    """The first section of a benchmark's markdown file without its heading (this report gives its own)."""
    if not path.is_file():
        return None
    text = path.read_text()
    body = text[text.index("\n## ") + 1:] if "\n## " in text else text
    return body.split("\n", 1)[1].strip()


def throughput(run: Path, peak_tflops: float) -> dict | None:
    """Means over the logged windows after the first (which holds start-up and warm-up)."""
    recs = records(run)
    steps = [r for r in recs if "tokens_per_s" in r]
    cfg = run_config(run)
    if not steps or cfg is None:
        return None
    timed = steps[1:] or steps
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in ["tokens_per_s", *(f"ms_{p}" for p in PHASES)]}
    m = cfg["model"]
    params = next(r["params"] for r in recs if "params" in r) - m["vocab_size"] * m["d_model"]
    step_ms = sum(mean[f"ms_{p}"] for p in PHASES)
    out = {"tokens_per_s": mean["tokens_per_s"], "mfu": mfu(mean, params, cfg, peak_tflops), "step_ms": step_ms,
           **{p: mean[f"ms_{p}"] for p in PHASES},
           "constraint_share": (mean["ms_constraint"] + mean["ms_certificate"]) / step_ms if step_ms else None}
    peaks = [r["peak_mem_gib"] for r in steps if "peak_mem_gib" in r]
    from distlip.config import config_from_dict
    from distlip.memory import estimate_memory

    est = estimate_memory(config_from_dict(cfg))
    out["predicted_gib"] = est.peak / 2**30
    out["train_peak_gib"] = est.train_peak / 2**30
    if peaks:
        out["peak_gib"] = max(peaks)
        out["memory_error"] = out["peak_gib"] / out["predicted_gib"] - 1
    return out


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "tokens_per_s" in r}


def fast_path(out: Path, peak_tflops: float) -> tuple[dict, str] | None:
    """The fast path's run against run 1, and the float32 losses of the two check runs."""
    eager, fast = throughput(out / "145m", peak_tflops), throughput(out / "145m_fast", peak_tflops)
    a, b = step_losses(out / "check_eager"), step_losses(out / "check_fast")
    if eager is None or fast is None or not a or a.keys() != b.keys():
        return None
    cfg = run_config(out / "145m_fast")["train"]
    rows = [{"path": "eager (run 1)", **eager}, {"path": f"attention={cfg['attention']}, compile={cfg['compile']}",
                                                 **fast}]
    cols = [("path", "{}"), ("tokens_per_s", "{:,.0f}"), ("step_ms", "{:.1f}"), ("forward", "{:.1f}"),
            ("backward", "{:.1f}"), ("optimizer", "{:.1f}"), ("peak_gib", "{:.2f}")]
    steps = [{"step": k, "eager": a[k], "fast": b[k], "rel_diff": abs(b[k] - a[k]) / abs(a[k])} for k in sorted(a)]
    worst = max(r["rel_diff"] for r in steps)
    speedup = fast["tokens_per_s"] / eager["tokens_per_s"]
    goals = [(f"float32 losses within {FAST_PATH_RTOL:g} of eager at every step (worst {worst:.2g})",
              worst <= FAST_PATH_RTOL),
             (f"faster than eager ({speedup:.2f}× the tokens/s)", speedup > 1)]
    body = ("Throughput (means after the first logged window, which holds the compilation):\n\n"
            + table(rows, cols) + "\n\nFloat32 training losses, eager and fast path, step by step:\n\n"
            + table(steps, [("step", "{}"), ("eager", "{:.6f}"), ("fast", "{:.6f}"), ("rel_diff", "{:.2g}")])
            + "\n\n" + "\n".join(f"- {g}: {'met' if ok else 'NOT met'}" for g, ok in goals)
            + "\n\nThe default stays eager unless both are met.")
    return {"eager": eager, "fast": fast, "losses": steps, "worst_rel_diff": worst, "speedup": speedup}, body


def final(run: Path) -> dict | None:
    return next((r for r in reversed(records(run)) if r.get("event") == "final"), None)


def section(title: str, body: str | None, missing: str) -> str:
    return f"## {title}\n\n{body if body is not None else f'(missing: {missing})'}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--nproc", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out)
    report: dict = {}
    parts = [f"# GPU benchmark tables\n\n{provenance()}. Command: `benchmarks/gpu.sh`.\n"]

    big = throughput(out / "145m", args.peak_tflops)
    report["145m"] = big
    body = None
    if big is not None:
        cols = [("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}"), ("step_ms", "{:.1f}"),
                *((p, "{:.1f}") for p in PHASES), ("constraint_share", "{:.2%}")]
        mem_cols = [("peak_gib", "{:.2f}"), ("predicted_gib", "{:.2f}"), ("train_peak_gib", "{:.2f}"),
                    ("memory_error", "{:+.1%}")]
        goals = [("tokens/s ≥ 420K", big["tokens_per_s"] >= GOAL_TOKENS_PER_S),
                 ("constraint + certificate ≤ 3% of the step", (big["constraint_share"] or 1) <= GOAL_CONSTRAINT_SHARE),
                 ("peak memory within 10% of the model",
                  big.get("memory_error") is not None and abs(big["memory_error"]) <= GOAL_MEMORY_ERROR)]
        body = ("Throughput (means after the first logged window; phases in ms per step):\n\n" + table([big], cols)
                + "\n\nPeak memory (GiB, `torch.cuda.max_memory_allocated`) against `distlip.memory`:\n\n"
                + table([big], mem_cols) + "\n\n"
                + "\n".join(f"- {g}: {'met' if ok else 'NOT met'}" for g, ok in goals))
    parts.append(section("145M preset, one GPU", body, "no metrics in 145m/ (see 145m.log)"))

    end = final(out / "145m")
    audit = out / "145m_certify.txt"
    body = None
    if end is not None and audit.is_file():
        body = (f"Final: val_loss {end['val_loss']:.4f}, val_acc {end['val_acc']:.2%}, lipschitz_bound "
                f"{end['lipschitz_bound']:.4g}, max ‖W‖/cap {end['max_cap_ratio']:.4f}, "
                f"certified {end['certified']}.\n\n"
                f"`distlip certify` (exact SVD of every matrix):\n\n```\n{audit.read_text().rstrip()}\n```")
    report["145m_final"] = end
    parts.append(section("145M preset: exact-SVD audit after training", body, "145m final record or 145m_certify.txt"))

    sk = final(out / "shakespeare")
    report["shakespeare"] = sk
    body = None
    if sk is not None:
        body = table([sk], [("step", "{}"), ("val_loss", "{:.4f}"), ("val_acc", "{:.2%}"),
                            ("lipschitz_bound", "{:.4g}"),
                            ("max_cap_ratio", "{:.4f}"), ("certified", "{}"), ("train_seconds", "{:.1f}")])
    parts.append(section("Shakespeare recipe", body, "no final record in shakespeare/ (see shakespeare.log)"))

    body = embedded(out / "compression.md")
    if body is not None:
        if args.nproc == 1:
            body = ("One process: NCCL takes one process per GPU, so this times the codec alone (no collective "
                    "crosses a link).\n\n" + body)
    report["compression"] = body
    parts.append(section("Compressed exchange of the 145M gradients", body, "compression.md (see compression.log)"))

    body = embedded(out / "frontier.md")
    report["frontier"] = body
    parts.append(section("Frontier sweep (Shakespeare model, small certified bounds)", body,
                         "frontier.md (see frontier.log)"))

    fast = fast_path(out, args.peak_tflops)
    report["fast_path"] = fast[0] if fast else None
    parts.append(section("Fast path against the eager path", fast[1] if fast else None,
                         "145m_fast/, check_eager/ or check_fast/ metrics (see 145m_fast.log, check_*.log)"))

    (out / "tables.md").write_text("\n".join(parts))
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print((out / "tables.md").read_text())


if __name__ == "__main__":
    main()

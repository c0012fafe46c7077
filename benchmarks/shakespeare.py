"""The paper's Shakespeare recipe (256×3, context 256, batch 64, 2000 steps, Muon) on the
standard benchmark text, per constraint method: validation accuracy, loss, certified bound.

The full recipe wants a GPU (`--device cuda`); `--steps` shortens it for a CPU check.

    python benchmarks/shakespeare.py --methods soft_cap --sigma-max 2 [--device cuda] [--steps 2000] \
        [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import final, provenance, table, train, write_section

SECTION = "## Shakespeare recipe"
PAPER = ("The paper reports ≈60% validation accuracy at a 2-Lipschitz bound (docs/method.md#reference-results) "
         "after 2000 steps.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["soft_cap", "hard_cap", "spectral_normalize"])
    ap.add_argument("--sigma-max", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--text", required=True, help="benchmark text, e.g. the char-rnn tinyshakespeare.txt")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    ap.add_argument("--results", default="", help="write (replace) this benchmark's section in this markdown file")
    args = ap.parse_args()
    if not Path(args.text).is_file():
        raise SystemExit(f"benchmark text {args.text} not found; pass --text PATH")

    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            records = train(Path(tmp) / "run", "configs/shakespeare-paper.yaml", [
                "data.source=text", f"data.path={args.text}", f"constraint.method={method}",
                f"constraint.sigma_max={args.sigma_max}", f"train.steps={args.steps}", f"train.device={args.device}",
                "train.eval_every=0", *args.set])
            r = final(records)
            rows.append({"method": method, "sigma_max": args.sigma_max, "steps": args.steps,
                         "val_acc": 100 * r["val_acc"],
                         "val_loss": r["val_loss"], "bound": r["lipschitz_bound"], "certified": r["certified"],
                         "minutes": (time.perf_counter() - start) / 60})
    text = table(rows, [("method", "{}"), ("sigma_max", "{:g}"), ("steps", "{}"), ("val_acc", "{:.2f}"),
                        ("val_loss", "{:.4f}"), ("bound", "{:.4g}"), ("certified", "{}"), ("minutes", "{:.1f}")])
    print(f"Shakespeare recipe on {args.text}; validation on the whole held-out 10%")
    print(text)
    if args.results:
        command = "python benchmarks/shakespeare.py " + " ".join(sys.argv[1:])
        write_section(Path(args.results), SECTION, f"{SECTION}\n\n{provenance()}. Command: `{command}`. "
                      "The paper's recipe (256×3, context 256, batch 64, Muon, lr decayed linearly to 0) "
                      f"on the char-rnn text; validation on the whole held-out 10%. {PAPER}\n\n{text}\n")


if __name__ == "__main__":
    main()

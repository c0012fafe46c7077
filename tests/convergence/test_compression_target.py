"""The compression target, run for real (benchmarks/compression_scale.py: same model, tokens and
seed for every method): at 8 ranks, the outer loop with int4_sum pseudo-gradients moves ≥ 100× fewer
bytes per rank than dense per-step training (every collective counted) at ≤ 1.5% final
validation-loss gap, certified at the end.

The global batch is 256 sequences, 32 per rank. At the benchmark's default 32 (4 per rank) the
same configurations end 2–3% above dense (benchmarks/RESULTS.md): each rank's local steps are too
noisy for averaging displacements to recover dense's batch.
"""

import json
import subprocess
import sys

from helpers import ROOT

CANDIDATES = ["outer H32 lr0.7 m0.5 + int4_sum", "outer H64 lr0.7 m0.5 + int4_sum"]


def test_eight_ranks_100x_fewer_bytes_within_one_and_a_half_percent(tmp_path):
    subprocess.run([sys.executable, "benchmarks/compression_scale.py", "--ranks", "8", "--methods", "dense",
                    *CANDIDATES, "--set", "train.batch_size=256", "--out", str(tmp_path),
                    "--plot", str(tmp_path / "scale.png")],
                   cwd=ROOT, check=True, capture_output=True, timeout=3600)
    rows = {r["method"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("*/result.json"))}
    dense = rows["dense"]
    assert all(r["certified"] for r in rows.values())
    within = [(dense["MB per rank"] / r["MB per rank"], r["method"]) for r in map(rows.get, CANDIDATES)
              if r["val loss"] <= 1.015 * dense["val loss"]]
    assert within and max(within)[0] >= 100, (within, {m: r["val loss"] for m, r in rows.items()})

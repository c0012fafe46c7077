"""The compression target that distlip does not meet yet, run for real and expected to fail (strict:
the day it passes, the xfail fails and the target is claimed by removing it).

At 8 ranks, some configuration must move ≥ 100× fewer bytes per rank than dense per-step training
(every collective counted) at ≤ 1.5% final validation-loss gap, certified at the end. The candidates
are the benchmark's best so far (benchmarks/compression_scale.py, same model, tokens and seed).
"""

import json
import subprocess
import sys

import pytest

from helpers import ROOT

CANDIDATES = ["lowrank r4", "outer H8 lr0.7 m0.5 + int4_sum", "outer H32 lr0.7 m0.5 + int4_sum",
              "outer H64 lr0.7 m0.5 + int4_sum"]


@pytest.mark.xfail(strict=True, reason="not met: measured 2026-12-02 at 8 ranks, 200 steps, best within 1.5% is "
                   "lowrank r4 at 9.9x fewer bytes (+1.45%); the outer loop with int4_sum pseudo-gradients (codes "
                   "summed in int8, lr 0.7, momentum 0.5) reaches 29.5x at +1.7% (H8), 86.9x at +2.3% (H32), 128.6x "
                   "at +2.7% (H64); at 800 steps the gap grows (H32 116.6x +3.7%, H64 207x +4.0%; see "
                   "benchmarks/RESULTS.md)")
def test_eight_ranks_100x_fewer_bytes_within_one_and_a_half_percent(tmp_path):
    subprocess.run([sys.executable, "benchmarks/compression_scale.py", "--ranks", "8", "--methods", "dense",
                    *CANDIDATES, "--out", str(tmp_path), "--plot", str(tmp_path / "scale.png")],
                   cwd=ROOT, check=True, capture_output=True, timeout=3600)
    rows = {r["method"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("*/result.json"))}
    dense = rows["dense"]
    assert all(r["certified"] for r in rows.values())
    best = max((dense["MB per rank"] / r["MB per rank"], r["method"]) for r in map(rows.get, CANDIDATES)
               if r["val loss"] <= 1.015 * dense["val loss"])
    assert best[0] >= 100, best

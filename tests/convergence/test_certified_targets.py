"""The certified-accuracy targets that distlip does not meet yet, run for real and expected to fail
(strict: the day one passes, the xfail fails and the target is claimed by removing it).

The default run (`configs/default.yaml`, what `make train` trains: ~10 min on 2 idle cores) must
end certified at a Lipschitz bound ≤ 100 (exact SVD) with whole-split validation accuracy ≥ 50.6%,
the accuracy the same recipe reached when it was certified at ~10⁸.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.xfail(strict=True, reason="not met: measured 2026-12-02 the default run ends certified at "
                   "4.8e8 with 50.4% (target: bound <= 100 with >= 50.6%); see benchmarks/RESULTS.md")
def test_default_run_is_certified_at_most_100_without_losing_accuracy(tmp_path):
    out = tmp_path / "default"
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}
    subprocess.run([sys.executable, "-m", "distlip", "train", "--config", "configs/default.yaml", "--out", str(out),
                    "train.progress=false", "train.tensorboard=false"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=3600)
    final = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if r.get("event") == "final")
    assert final["exact"] and final["certified"]
    assert final["lipschitz_bound"] <= 100, final["lipschitz_bound"]
    assert final["val_acc"] >= 0.506, final["val_acc"]

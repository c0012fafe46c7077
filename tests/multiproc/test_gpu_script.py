"""`benchmarks/gpu.sh` runs end to end in its CPU dry mode, so it cannot rot before a GPU appears."""

import os
import subprocess

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_table(tmp_path):
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout, proc.stdout
    # the one line saying what this machine cannot do
    assert "cannot time a cross-GPU exchange here" in proc.stdout
    assert "cannot train through FlexAttention on the CPU" in proc.stdout
    tables = (tmp_path / "tables.md").read_text()
    assert "(missing" not in tables, tables
    for heading in ("## 145M preset, one GPU", "## 145M preset: exact-SVD audit after training",
                    "## Shakespeare recipe", "## Compressed exchange of the 145M gradients",
                    "## Fast path against the eager path"):
        assert heading in tables
    assert "tokens_per_s" in tables and "predicted_gib" in tables and "lipschitz_bound" in tables
    assert "topk 1% + ef21" in tables
    assert "attention=sdpa, compile=True" in tables and "float32 losses within" in tables

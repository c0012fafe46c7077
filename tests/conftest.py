"""Test tiers by folder: `unit/` (one process, seconds), `multiproc/` (torchrun, mp.spawn: marked
`slow`), `convergence/` (loss-threshold trainings: marked `slow` and `convergence`, left out of the
default run by `addopts` in pyproject.toml; `make test-convergence` runs them). Shared code lives
in `helpers/`, imported as the `helpers` package."""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Under any import mode: `from helpers.distlaunch import run_worker` works in every tier.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# Tests share two CPU cores; compilation would only add start-up time.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed's JIT build cache of this environment, as the Makefile sets it (pytest run directly).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    models run fastest so, and the machine's two cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TIER_MARKS = {"multiproc": ("slow",), "convergence": ("slow", "convergence")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path.resolve()
        tier = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else None
        for mark in TIER_MARKS.get(tier, ()):
            item.add_marker(getattr(pytest.mark, mark))

# Two commands: `make train` (fresh clone → environment → default run) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml
# DeepSpeed JIT-builds a comm op on first use (~35 s); keep the build between runs, in the
# environment it was built against: a cache shared by environments rebuilds for each in turn
# (the build records the paths of its torch), and their builds wait on one another's lock.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export TORCH_COMPILE_DISABLE ?= 1

.PHONY: install ci-deps train test test-fast test-convergence lint bench clean

# `make train` installs what training on one process needs; the tests, the linter, the benchmarks'
# plots and multi-process launches (DeepSpeed, accelerate) add the `dist` and `dev` extras.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# A machine with no torch gets the CPU build, not the multi-GB CUDA default.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[dist,dev]"
	touch $@

install: $(BIN)/.installed-dev

# System packages of the fault tests: a real one-node SLURM (munge, slurmctld, slurmd) and
# iproute2 for the two-host network namespaces. Debian/Ubuntu, as root; skipped when present.
CI_PACKAGES := munge slurmctld slurmd slurm-client iproute2
ci-deps:
	@if command -v munged >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
	    && command -v sbatch >/dev/null && command -v ip >/dev/null; then \
	  echo "ci-deps: SLURM, munge and iproute2 present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CI_PACKAGES); \
	else \
	  echo "ci-deps: cannot install $(CI_PACKAGES) (needs root and apt-get); the SLURM and two-host tests will be skipped"; \
	fi

train: $(BIN)/.installed
	$(BIN)/distlip train --config $(CONFIG) --resume auto

# Lint first (seconds), then every test but the convergence tier; the slowest 15 are listed.
test: lint
	$(BIN)/python -m pytest -q tests --durations=15

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow"

bench: install
	$(BIN)/python benchmarks/constraints.py

clean:
	rm -rf runs .pytest_cache

# Loss-threshold trainings (tests/convergence/): minutes of 2-process training, kept out of `make test`.
test-convergence: install
	$(BIN)/python -m pytest -q tests -m convergence

lint: install
	$(BIN)/ruff check distlip tests benchmarks

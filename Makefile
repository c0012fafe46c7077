# Two commands: `make train` (fresh clone → environment → default run) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml
# DeepSpeed JIT-builds a comm op on first use (~35 s); keep the build between runs and clones.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/distlip/torch_extensions
export TORCH_COMPILE_DISABLE ?= 1

.PHONY: install train test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# A machine with no torch gets the CPU build, not the multi-GB CUDA default.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dist,dev]"
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/distlip train --config $(CONFIG) --resume auto

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow"

bench: install
	$(BIN)/python benchmarks/constraints.py

clean:
	rm -rf runs .pytest_cache

# Loss-threshold trainings (tests/convergence/): minutes of 2-process training, kept out of `make test`.
.PHONY: test-convergence lint
test-convergence: install
	$(BIN)/python -m pytest -q tests -m convergence

lint: install
	$(BIN)/ruff check distlip tests benchmarks

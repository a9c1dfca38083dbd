# fmlab: `make train` runs the main job, `make test` the test suite; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
ARGS ?=
# make test runs test files in parallel, one process per CPU, each with one torch thread: measured on 2 cores,
# 4:37 against 7:17 serial (5:06-5:47 since the MeanFlow and C2OT tests, 5:24 after the in-process error checks,
# 4:00 since commands fork from a server that imported the heavy dependencies once: tests/cli_process.py);
# two processes with torch's default threads each took 11:14 (their threads contend)
TEST_WORKERS ?= auto
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help install train test test-all lint format bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

# setuptools' editable build warns "Editable installation." whenever a package dir is mapped (conf/ -> fmlab.conf):
# informational, nothing a user can act on, so the install filters that one message
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install fmlab with its dev extras (once; again when pyproject.toml changes)

train: $(STAMP)  ## Train the main job: FM-OT on 2D moons (extra Hydra overrides: make train ARGS="seed=1")
	$(BIN)/python -m fmlab.train $(ARGS)

test: $(STAMP)  ## Run the test suite (tests marked slow excluded)
	$(PYTEST) $(ARGS)

test-all: $(STAMP)  ## Run every test, slow ones included
	$(PYTEST) -m "slow or not slow" $(ARGS)

lint: $(STAMP)  ## ruff check and format check
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)  ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python benchmarks/bench_requirements.py > $(VENV)/bench-requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r $(VENV)/bench-requirements.txt  # why --no-deps: pyproject.toml
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## Benchmark: ratios against bare PyTorch / torchdiffeq loops and TorchCFM, side by side
	$(BIN)/python benchmarks/bench.py $(ARGS)

clean:  ## Remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

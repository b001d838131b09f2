# Two commands do everything on a fresh Debian machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup data demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

data:
	@scripts/ensure-data.sh

# Compress the shipped trained ResNet-20 with SLBF to a 20 KB file on Fashion-MNIST and print
# the before/after table and the per-layer size table (benchmarks/demo.py times and measures
# it: benchmarks/results/demo.json).
demo: setup data
	rm -rf runs/demo
	$(BIN)/cnnpress compress --recipe recipes/demo.yaml --out runs/demo
	$(BIN)/cnnpress summary runs/demo

# The whole test suite (slow real-data tests included; they run with small settings).
test: setup data
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-logo
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

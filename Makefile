# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Each creates .venv if needed and installs lmforge into it.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch that CI machines carry; on a GPU machine pass e.g.
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup setup-test quickstart test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .

setup-test: setup
	$(BIN)/pip install -q -e ".[test]"
	./scripts/install-browser.sh

quickstart: setup
	$(BIN)/lmforge quickstart

lint: setup-test
	$(BIN)/ruff check src tests bench

test: lint
	$(BIN)/python -m pytest -n 2 --timeout 900

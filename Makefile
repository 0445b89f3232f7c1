# logitbank: every target sets itself up (`make setup` is a prerequisite), so one command is
# enough on a fresh machine. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The pinned CPU build of torch: installed first where there is no CUDA driver, so the project's
# torch range is already met and pip never downloads a CUDA build of several GB.
TORCH_CPU := torch==2.13.0
CONFIG ?= stages/configs/default.yaml
RUN ?= runs/default
STORE ?= $(RUN)/store.zarr
SET ?=

.PHONY: help setup test bench lint clean verify audit plan

help: ## list the targets (the default goal)
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install logitbank (editable) with its test tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(STAMP) ## run the whole test suite (not the benchmarks)
	$(PY) -m pytest -q tests

bench: $(STAMP) ## run the benchmarks in tests/benchmarks and print their tables
	$(PY) -m tests.benchmarks

lint: $(STAMP) ## ruff: style and common bugs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check pipeline stages storage tests

verify: $(STAMP) ## check a store's checksums and completeness (STORE=path)
	$(PY) -m pipeline verify $(STORE)

audit: $(STAMP) ## bytes per row and KD-loss error of every encoding on a store (STORE=path)
	$(PY) -m pipeline audit $(STORE)

plan: $(STAMP) ## disk bytes, files and memory of a store before a run (N=, C=, V=, ENCODING=)
	$(PY) -m pipeline plan --num-samples $(or $(N),1281167) --num-classes $(or $(C),1000) \
	  --views $(or $(V),10) --encoding $(or $(ENCODING),float16)

clean: ## remove runs/ and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

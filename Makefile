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
# The run directory: the config's own run_dir unless given (RUN_DIR=...); a YAML value may be
# quoted ("runs/x" or 'runs/x'), the quotes are not part of the path.
RUN_DIR ?= $(or $(shell sed -n -E 's/^run_dir:[[:space:]]*("([^"]*)"|'\''([^'\'']*)'\''|([^[:space:]#"'\''][^[:space:]#]*)).*/\2\3\4/p' $(CONFIG) 2>/dev/null),runs/default)
ifneq ($(words $(RUN_DIR)),1)
$(error RUN_DIR '$(RUN_DIR)' holds a space, which make's file targets cannot: choose a run folder without spaces, or run the stages as python -m pipeline STAGE --set "run_dir=...")
endif
# STORE=path: the store `make verify` and `make audit` read; unset: the one CONFIG's precompute
# stage writes (CONFIG_STORE below).
STORE ?=
# Extra config overrides, space-separated: make teacher SET="teacher.epochs=1 data.train_subset=5000".
# Each word reaches the stage as it is (no shell quoting or $ expansion), so a mapping is written
# without spaces, as JSON: SET='distill.method_options={"beta":6}'.
SET ?=
# $(call quote,TEXT): TEXT as one shell word, whatever it holds.
quote = '$(subst ','\'',$(1))'
STAGE_ARGS = --config $(call quote,$(CONFIG)) --set $(call quote,run_dir=$(RUN_DIR)) \
  $(foreach s,$(SET),--set $(call quote,$(s)))
# The store CONFIG's precompute stage writes, printed by pipeline.config as that stage resolves it
# (Config.store_path: precompute.store, else RUN_DIR/store.zarr, or store.h5 with
# precompute.backend=hdf5), RUN_DIR and SET applied; a config it refuses is one line, exit 2.
# CONFIG_STORE runs only inside the recipes of verify and audit, so `make -n` and the other
# targets stay cheap.
define CONFIG_STORE_PY
import sys
from pipeline.config import load_config
from pipeline.errors import UserError
try:
    print(load_config(sys.argv[1], sys.argv[2:]).store_path)
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
endef
export CONFIG_STORE_PY
CONFIG_STORE = $(PY) -c "$$CONFIG_STORE_PY" $(call quote,$(CONFIG)) \
  $(call quote,run_dir=$(RUN_DIR)) $(foreach s,$(SET),$(call quote,$(s)))
# The shell assignment of `store` in verify and audit (whose recipes echo the command with the
# store resolved): STORE if given, else CONFIG_STORE's line (with -e, a config that CONFIG_STORE
# refuses stops the recipe there).
store_arg = store=$(if $(STORE),$(call quote,$(STORE)),"$$($(CONFIG_STORE))")
# run_dir is RUN_DIR's to set: from SET it would reach the stages but not make's own targets
# (their stamps, .make-settings), which would then sit in another folder and rerun every time.
ifneq ($(filter run_dir=%,$(SET)),)
$(error SET holds $(filter run_dir=%,$(SET)): set the run folder with RUN_DIR=... instead)
endif
# The targets that read CONFIG refuse a missing one in one line (make would say "No rule to make
# target", or the data recipe's grep would fail and go on).
ifneq ($(filter data teacher export precompute distill sweep report run verify audit,$(MAKECMDGOALS)),)
ifeq ($(wildcard $(CONFIG)),)
$(error config file '$(CONFIG)' does not exist: set CONFIG to a YAML file, e.g. stages/configs/default.yaml)
endif
endif
# Where Debian's dataset-fashion-mnist package puts the files (the default config reads them).
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: FORCE help setup data teacher export precompute distill sweep report run test bench lint clean \
  verify audit plan

help: ## list the targets (the default goal)
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install logitbank (editable) with its test tools (+ the gpu extra on a GPU machine)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_CPU); fi
	extras=test; if command -v nvidia-smi >/dev/null 2>&1; then extras=test,gpu; fi; \
	  $(PY) -m pip install -q -e ".[$$extras]"
	touch $@

data: ## install Fashion-MNIST (Debian's dataset-fashion-mnist) if it is missing
	@grep -qE '^\s*kind:\s*fashion_mnist' $(CONFIG) || exit 0; \
	 if ls $(FMNIST_DIR)/train-images-idx3-ubyte* >/dev/null 2>&1; then exit 0; fi; \
	 sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	 echo "installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"; \
	 $$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	 { $$sudo apt-get update -q >/dev/null && $$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	 { echo "error: could not install dataset-fashion-mnist: run 'sudo apt-get install dataset-fashion-mnist' or set data.path in the config" >&2; exit 2; }

# A stamp whose outputs are gone is no stamp (make would skip the stage, and the next one find
# nothing): precompute.done names its store (a local path must still be there), sweep.done the
# students it finished (each folder must still hold its student.pt or diverged.json).
ifneq ($(filter precompute distill sweep run,$(MAKECMDGOALS)),)
STALE_STAMPS := $(shell d=$(call quote,$(RUN_DIR)); \
  if [ -f "$$d/precompute.done" ]; then s=$$(head -n 1 "$$d/precompute.done"); \
    case "$$s" in (*://*) ;; (*) [ -n "$$s" ] && [ -e "$$s" ] || rm -f "$$d/precompute.done";; esac; fi; \
  if [ -f "$$d/sweep.done" ]; then while IFS= read -r r; do [ -z "$$r" ] || \
    [ -e "$$d/distill/$$r/student.pt" ] || [ -e "$$d/distill/$$r/diverged.json" ] || \
    { rm -f "$$d/sweep.done"; break; }; done < "$$d/sweep.done"; fi)
endif
# A student of another run's store (distill.store, in CONFIG or SET, other than the store this
# folder's precompute writes) needs none of this folder's teacher, export or store: `make
# distill` then builds none of them. Read from the config once the venv is there (a recipe).
OTHER_STORE_PY := import os, sys; from pipeline.config import load_config; \
  c = load_config(sys.argv[1], sys.argv[2:]); s, own = c.distill.store, str(c.store_path); \
  n = lambda p: p if "://" in p else os.path.abspath(p); print(s if s and n(s) != n(own) else "")

# Stage outputs are file targets: a finished stage is skipped (each stage also checks its own
# inputs and resumes an interrupted run). An edit of CONFIG or another SET runs the stages again,
# each of which then does only what the change asks for (or refuses it, naming the fix).
SETTINGS := $(RUN_DIR)/.make-settings
$(SETTINGS): FORCE
	@mkdir -p $(@D); printf '%s\n' $(call quote,$(CONFIG) $(SET)) | cmp -s - $@ 2>/dev/null || \
	  printf '%s\n' $(call quote,$(CONFIG) $(SET)) > $@
FORCE:

# make deletes a target whose recipe a Ctrl-C stopped after the file changed: a teacher (days of
# training for a large one) or its export saved just before the stage exited would go with it.
.PRECIOUS: $(RUN_DIR)/teacher.pt $(RUN_DIR)/teacher.onnx

teacher: $(RUN_DIR)/teacher.pt ## train the teacher of CONFIG (or take teacher.checkpoint)
$(RUN_DIR)/teacher.pt: $(STAMP) $(CONFIG) $(SETTINGS) | data
	$(PY) -m pipeline teacher $(STAGE_ARGS)
	@[ ! -f $@ ] || touch $@  # finished earlier with these settings: now up to date

export: $(RUN_DIR)/teacher.onnx ## export the teacher to ONNX, parity-checked against PyTorch
$(RUN_DIR)/teacher.onnx: $(RUN_DIR)/teacher.pt $(CONFIG) $(SETTINGS)
	$(PY) -m pipeline export $(STAGE_ARGS)
	@[ ! -f $@ ] || touch $@  # up to date with these settings: skipped until they change

precompute: $(RUN_DIR)/precompute.done ## the teacher's logits for every view into the run's store (precompute.store, default RUN_DIR/store.zarr; WORKERS=n: local dask; SCHEDULER=tcp://host:8786: a cluster; OVERWRITE=1: replace a store made from other inputs)
$(RUN_DIR)/precompute.done: $(RUN_DIR)/teacher.onnx $(CONFIG) $(SETTINGS)
	$(PY) -m pipeline precompute $(STAGE_ARGS) $(if $(WORKERS),--workers $(call quote,$(WORKERS))) $(if $(SCHEDULER),--scheduler $(call quote,$(SCHEDULER))) $(if $(OVERWRITE),--overwrite)

# NPROC=n: n processes on this machine under torchrun (DDP; one per GPU, or gloo on the CPU).
distill: $(STAMP) | data ## one student from the store (METHOD= STUDENT= SEED=: default the CONFIG's distill.method, .student, .seed, e.g. kd, mlp, 0 in default.yaml; NPROC=n)
	@other=$$($(PY) -c '$(OTHER_STORE_PY)' $(call quote,$(CONFIG)) $(call quote,run_dir=$(RUN_DIR)) \
	  $(foreach s,$(SET),$(call quote,$(s))) 2>/dev/null); [ -n "$$other" ] || \
	  $(MAKE) --no-print-directory precompute
	$(PY) -m pipeline distill $(STAGE_ARGS) $(if $(NPROC),--nproc $(call quote,$(NPROC))) \
	  $(if $(METHOD),--set $(call quote,distill.method=$(METHOD))) $(if $(STUDENT),--set $(call quote,distill.student=$(STUDENT))) \
	  $(if $(SEED),--set $(call quote,distill.seed=$(SEED)))

sweep: $(RUN_DIR)/sweep.done ## every (student, method, seed) of the config's sweep, from one store (NPROC=n: each under torchrun)
$(RUN_DIR)/sweep.done: $(RUN_DIR)/precompute.done $(CONFIG) $(SETTINGS)
	$(PY) -m pipeline sweep $(STAGE_ARGS) $(if $(NPROC),--nproc $(call quote,$(NPROC)))

report: $(STAMP) ## the results table (Markdown) and plots (PNG) of the run's students
	$(PY) -m pipeline report $(STAGE_ARGS)

run: sweep ## the default pipeline: data, teacher, export, precompute, sweep, report
	$(PY) -m pipeline report $(STAGE_ARGS)

test: $(STAMP) ## the test suite, without the slow tests (make bench) and the benchmarks
	$(PY) -m pytest -q tests

bench: $(STAMP) ## the slow tests, then every benchmark's table (BENCH="store losses": only those)
	$(if $(BENCH),,$(PY) -m pytest -q -m slow tests)
	$(PY) -m tests.benchmarks $(BENCH)

lint: $(STAMP) ## ruff: style and common bugs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check pipeline stages storage tests

verify: $(STAMP) ## check a store's checksums and completeness (STORE=path; default: the store CONFIG's precompute writes)
	@$(store_arg); echo "$(PY) -m pipeline verify $$store"; $(PY) -m pipeline verify "$$store"

audit: $(STAMP) ## bytes per row and KD-loss error of every encoding on a store (STORE=path; default: as verify)
	@$(store_arg); echo "$(PY) -m pipeline audit $$store"; $(PY) -m pipeline audit "$$store"

plan: $(STAMP) ## disk bytes, files and memory of a store before a run (N=, C=, V=, ENCODING=)
	$(PY) -m pipeline plan --num-samples $(or $(N),1281167) --num-classes $(or $(C),1000) \
	  --views $(or $(V),10) --encoding $(or $(ENCODING),float16)

clean: ## remove runs/ and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

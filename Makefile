# Two commands on a fresh machine: `make train` (the embedded default job) and
# `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false

.PHONY: install train test

install: $(STAMP)

# torch 2.13.0 first: a CPU build lies on this disk; an unpinned torch would pull a CUDA build of several GB.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[axolotl,dev]"
	touch $(STAMP)

# The embedded default job (CPU, ~1-2 min); axolotl execs `accelerate`, so .venv/bin goes on PATH.
train: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(OFFLINE) $(BIN)/axolotl train configs/qlora.yml

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest

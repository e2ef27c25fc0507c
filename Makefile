# Two commands do all the set-up on a fresh machine:
#   make demo   the main job on the embedded Fashion-MNIST data
#   make test   the test suite
#   make docs   the API reference (docs/api/, generated offline from the docstrings)
# Both create .venv when missing and install what they need. On a machine without a CUDA driver the
# CPU build of torch is installed; override with `make TORCH=torch==X.Y.Z ...`.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow install data lint docs bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,digits]"
	@touch $(STAMP)

install: $(STAMP)

data:
	@bash scripts/ensure-data.sh

demo: install data
	$(VENV)/bin/mentor demo

test: install data
	@bash scripts/ensure-chromium.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install data
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

docs: install
	PY=$(PY) bash scripts/build-docs.sh

bench: install data
	$(PY) benchmarks/throughput.py

clean:
	rm -rf runs .pytest_cache .ruff_cache

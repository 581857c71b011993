# The README's commands. Each works on a fresh machine with nothing done before it.
#   make demo   -- creates .venv if missing, installs, runs the demo
#   make test   -- creates/updates .venv, runs the whole test suite (slow tests included)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint readme-check bench-attention bench-train clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins the torch build on this machine's disk: no install may pull another one.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

# dvc.yaml runs the stages; `danet` must be on PATH for them. DVC needs a git repository.
demo: $(STAMP)
	@git rev-parse --git-dir >/dev/null 2>&1 || git init -q
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	$(VENV)/bin/danet summary

# Fast tests first (seconds), then the slow end-to-end ones (minutes): a broken unit fails early.
test: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"
	$(VENV)/bin/pytest -m slow

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

# The README's commands, run as written on a tiny copy of the pipeline (also part of `make test`).
readme-check: $(STAMP)
	$(VENV)/bin/pytest tests/test_e2e.py

lint: $(STAMP)
	$(VENV)/bin/ruff check danet pipeline tests bench
	$(VENV)/bin/ruff format --check danet pipeline tests bench
	$(VENV)/bin/mypy

bench-attention: $(STAMP)
	$(PY) bench/attention.py

bench-train: $(STAMP)
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The README's commands. Each works on a fresh machine with nothing done before it.
#   make demo   -- creates .venv if missing, installs, runs the demo
#   make test   -- creates/updates .venv, runs the whole test suite (slow tests included)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install demo params test test-fast lint readme-check ui-check bench-attention bench-train gpu-bundle clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# uv installs (pip's resolution, in Rust, many files at once): a fresh .venv takes under a minute
# where pip took 3:25 (BENCHMARKS.md, "CI on a clean clone"). It reads no pip configuration, so
# pip's package sources (find-links, indexes and constraints from pip.conf or PIP_* variables:
# where a machine keeps its torch build) are handed on to it, and like pip it takes each package's
# best version over all indexes. constraints.txt pins the torch build on this machine's disk: no
# install may pull another one. Byte-compiled at install: with PYTHONDONTWRITEBYTECODE (set on
# some machines) Python would otherwise compile every module again in every Ray worker process.
# The demo needs the runtime dependencies only; the tests and linters add the dev extra.
UV := $(VENV)/bin/uv
PIP_SOURCES = $(shell $(PIP) config list 2>/dev/null \
  | sed -nE "s/^[^.]*\.(find-links|index-url|extra-index-url|constraint)='(.*)'$$/\1 \2/p" \
  | awk '{for (i = 2; i <= NF; i++) printf "--%s %s ", $$1, $$i}')
UV_INSTALL = $(UV) pip install -q --python $(PY) --compile-bytecode \
  --index-strategy unsafe-best-match $(PIP_SOURCES) -c constraints.txt

$(UV): | $(PY)
	$(PIP) install -q uv

$(STAMP): pyproject.toml constraints.txt | $(UV)
	$(UV_INSTALL) torch==2.14.1 torchvision==0.29.1 -e .
	touch $@

$(DEV_STAMP): $(STAMP)
	$(UV_INSTALL) -e '.[dev]'
	touch $@

install: $(DEV_STAMP)

# dvc.yaml runs the stages; `danet` must be on PATH for them. DVC needs a git repository.
demo: $(STAMP)
	@git rev-parse --git-dir >/dev/null 2>&1 || git init -q
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	$(VENV)/bin/danet summary

# A preset (configs/NAME.yaml: what differs from params.yaml) written out as a complete params.yaml,
# which `dvc repro` reads: make params PRESET=cityscapes. `git checkout params.yaml` is the demo's.
# Written to a temporary file first: an unknown preset leaves params.yaml as it was.
params: $(STAMP)
	@test -n "$(PRESET)" || { echo "usage: make params PRESET=NAME (configs/NAME.yaml)" >&2; exit 2; }
	$(PY) -m pipeline.presets $(PRESET) > params.yaml.tmp && mv params.yaml.tmp params.yaml \
	  || { rm -f params.yaml.tmp; exit 2; }

# Fast tests first (seconds, TEST_WORKERS processes through pytest-xdist), then the slow
# end-to-end ones (minutes) one at a time: each trains on every core, two at once only compete
# (measured: no faster, BENCHMARKS.md), and a multi-node Ray cluster's head would be joined by
# any other test's ray.init(). A broken unit fails early.
TEST_WORKERS ?= 2
test: $(DEV_STAMP)
	$(VENV)/bin/pytest -m "not slow" -n $(TEST_WORKERS)
	$(VENV)/bin/pytest -m slow --durations=30

test-fast: $(DEV_STAMP)
	$(VENV)/bin/pytest -m "not slow" -n $(TEST_WORKERS)

# The README's commands, run as written on a tiny copy of the pipeline (also part of `make test`).
readme-check: $(DEV_STAMP)
	$(VENV)/bin/pytest tests/test_e2e.py

# The MLflow UI after `make demo`, in a real browser: screenshots of the README's views into
# docs/ui/ and checks of what each shows. Needs Debian's chromium (apt-get install chromium).
ui-check: $(DEV_STAMP)
	$(PY) tests/ui_check.py --out docs/ui

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check danet pipeline tests bench
	$(VENV)/bin/ruff format --check danet pipeline tests bench
	$(VENV)/bin/mypy

bench-attention: $(DEV_STAMP)
	$(PY) bench/attention.py

bench-train: $(DEV_STAMP)
	$(PY) bench/train_step.py

# What one call to a bare GPU machine carries in .device/ (git-ignored; README "On a GPU machine"):
# ../shared/gpu/prepare.sh's wheels, env.sh and CamVid shards; the shards again at JPEG quality
# 90 (prepare.sh's q95 is 37 MB: with the bundle's 36 MB and the checkout over the 64 MiB a call
# carries; q90 is 27 MB, labels exact either way); the bundle (Python 3.12 wheels from PyPI,
# cached); then what the call carries in all, which must be under 64 MiB.
CAMVID ?= $(abspath ../shared/data/camvid)
gpu-bundle: $(DEV_STAMP)
	CAMVID=$(CAMVID) ../shared/gpu/prepare.sh
	$(VENV)/bin/danet shard --dataset camvid --root $(CAMVID) --out .device/camvid --splits train,val \
	  --set shard.image_format=jpg --set shard.jpeg_quality=90 --set shard.max_count=100 --workers 2
	$(PY) bench/gpu_bundle.py build
	$(PY) bench/gpu_bundle.py size

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# One command for the main job and one for the tests; each does its own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
# UTF-8 text I/O whatever the machine's locale (CI may run with none: Python would fall back to ASCII)
export PYTHONUTF8 := 1

.PHONY: setup repro test test-fast lint clean

# torch first, pinned, so a CPU-only machine takes its local CPU wheel and never a multi-GB CUDA build
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

# The stage commands call `python`: the venv's bin goes first on PATH, so `make repro` works without an
# activated venv. .dvc/ is committed, so a git clone needs no `dvc init`; outside git (a tarball) DVC
# runs without SCM (then `dvc exp` / `params diff` / `metrics diff` are unavailable).
repro: $(STAMP)  ## run the whole DVC pipeline (data -> preprocess -> train -> evaluate)
	test -d .dvc || $(VENV)/bin/dvc init -q $$(git rev-parse --is-inside-work-tree >/dev/null 2>&1 || echo --no-scm)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc metrics show

# pytest's own exit status is kept in $(VENV)/.pytest-status (make itself exits 2 on any failure):
# .ci/run passes it on, so CI can tell failures (1) from "no tests collected" (5).
# ruff first (the rules configured in pyproject.toml): a lint failure is a test failure (status 1).
test: $(STAMP)  ## lint + the whole test suite, slow end-to-end tests included
	$(VENV)/bin/ruff check pipeline tests benchmarks notebooks || { echo 1 > $(VENV)/.pytest-status; exit 1; }
	$(PY) -m pytest -q; status=$$?; echo $$status > $(VENV)/.pytest-status; exit $$status

test-fast: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests benchmarks notebooks
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests benchmarks notebooks

clean:
	rm -rf data models results dvc_plots mlflow.db mlartifacts

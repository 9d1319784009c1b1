# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv, installs what it needs (pip packages, Debian packages), and skips
# installs that are already satisfied on a second run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_HASH := $(shell cat requirements.txt pyproject.toml | md5sum | cut -c1-12)
DEV_HASH := $(shell cat requirements.txt requirements-dev.txt pyproject.toml | md5sum | cut -c1-12)
RUN_STAMP := $(VENV)/.stamp-run-$(RUN_HASH)
DEV_STAMP := $(VENV)/.stamp-dev-$(DEV_HASH)
PYTEST_ARGS ?=
DEMO_ARGS ?= --simulate 30

.PHONY: test demo lint install install-dev system-deps bench clean

test: install-dev system-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/pstudy demo $(DEMO_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

$(VENV)/bin/python:
	@bash .ci/system-deps --venv $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(DEV_STAMP): | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@ $(RUN_STAMP)

# Debian packages the tests need: chromium (browser tests), postgresql (database tests)
# and r-cran-lme4 (R lme4, the reference for the GLMM tests).
system-deps:
	@bash .ci/system-deps

bench: install-dev
	for script in bench/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache test-artifacts

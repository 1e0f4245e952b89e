# One command for each job; each creates .venv and installs on a fresh machine.
# The `bench` extra (the peer flow libraries) is installed too, so the tests check every
# benchmark provider against the reference.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Two install levels: BASE (the package and its runtime dependencies: what `make demo` needs) and
# STAMP (BASE + the dev tools and the peer libraries the tests and benchmarks compare against).
BASE   := $(VENV)/.fastnvp-base
STAMP  := $(VENV)/.fastnvp-installed
# A machine without an NVIDIA driver gets the CPU build of torch first, so the
# `torch>=2.7` requirement is already met and no multi-GB CUDA wheel is pulled.
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test test-all lint format bench compat compat-ci clean

install: $(STAMP)

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(PY) -m pip install -q -e '.[dev,bench,sbi,data]'
	touch $(STAMP)

demo: $(BASE)
	$(PY) -m fastnvp demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m fastnvp bench --quick
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-autosave

# Every kernel on every Triton a supported torch ships with: a cached venv per Triton under
# .compat/, the sm_90 compile report and the interpreter kernel tests in each; the table goes to
# benchmarks/results/compat/. compat-ci: the GPU image's Triton (3.6.0) and the floor's only.
TRITONS ?= 3.3.1,3.4.0,3.5.1,3.6.0,3.9.0
CI_TRITONS ?= 3.6.0,3.3.1

compat:
	$(PYTHON) benchmarks/compat.py --tritons $(TRITONS)

compat-ci:
	$(PYTHON) benchmarks/compat.py --tritons $(CI_TRITONS) --out .compat/ci

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

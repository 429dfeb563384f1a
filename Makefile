# curvscope: `make demo` runs the main job on the built-in digits problem, `make test` the
# tests, `make reproduce` every reproduction of the papers' claims (docs/reproductions.md),
# `make docs` the documentation site with its API reference; all set up .venv first. torch is
# always installed through constraints.txt, which pins the CPU build (an unpinned torch pulls a
# multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip

.PHONY: venv demo test lint clean-venv reproduce docs

venv: $(STAMP)

# Re-runs when pyproject.toml or constraints.txt change (the stamp is then older).
# torchvision for the model zoo's ResNet-18: every torchvision release built for torch 2.13
# is a CUDA build that fails to import beside the CPU torch ("operator torchvision::nms does
# not exist"), and its metadata asks for its own torch. 0.16.2 imports (its compiled ops stay
# unloaded; torchvision.models is pure Python) and builds the same ResNet-18 as today's
# releases; --no-deps keeps pip from replacing torch with the 2.1.2 its metadata names.
TORCHVISION := torchvision==0.16.2

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install --no-deps $(TORCHVISION)
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

demo: venv
	$(BIN)/curvscope density
	$(BIN)/curvscope top
	$(BIN)/curvscope trace

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments

# Every experiments/*.py (5 seeds each, one thread each, two at a time) and
# docs/reproductions.md from their summaries: under an hour on 2 cores. QUICK=1: tiny settings,
# one seed, everything under results/reproduce_quick/ (docs/ untouched), a few minutes; it
# checks that every reproduction runs end to end, not its verdicts (tests/test_reproduce.py).
QUICK ?=
REPRODUCE_ARGS ?=
reproduce: venv
	$(BIN)/python experiments/reproduce.py $(if $(QUICK),--quick) $(REPRODUCE_ARGS)

# The documentation site (docs/*.md and the API reference generated from the docstrings,
# mkdocs.yml) into site/; open site/index.html. --strict: a broken link between pages, a broken
# anchor or a cross-reference to an API object that does not exist fails the build.
docs: venv
	$(BIN)/mkdocs build --strict

clean-venv:
	rm -rf $(VENV)

# Side-by-side benchmark against PyHessian, curvlinops and hessian-eigenthings (issue 5). The
# comparison packages live in their own environment, .venv-bench, never in curvscope's
# dependencies; torch there is the same pinned CPU build (constraints.txt).
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_PIP := $(BENCH_VENV)/bin/python -m pip
BENCH_ARGS ?=

.PHONY: bench-env bench-compare

bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml constraints.txt benchmarks/requirements-bench.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PIP) install -c constraints.txt torch==2.13.0
	$(BENCH_PIP) install -c constraints.txt -e .
	$(BENCH_PIP) install --no-deps -c constraints.txt -r benchmarks/requirements-bench.txt
	touch $@

# About 15 minutes on 2 busy cores; BENCH_ARGS="--quick" for a smoke run of a few minutes.
bench-compare: bench-env
	$(BENCH_VENV)/bin/python benchmarks/compare.py $(BENCH_ARGS)

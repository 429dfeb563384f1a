# curvscope: `make demo` runs the main job on the built-in digits problem, `make test` the
# tests; both set up .venv first. torch is always installed through constraints.txt, which
# pins the CPU build (an unpinned torch pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip

.PHONY: venv demo test lint clean-venv

venv: $(STAMP)

# Re-runs when pyproject.toml or constraints.txt change (the stamp is then older).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/curvscope density
	$(BIN)/curvscope top
	$(BIN)/curvscope trace

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean-venv:
	rm -rf $(VENV)

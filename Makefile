# `make test` works in a fresh clone: it creates .venv when missing, installs the project, runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The quickstart end to end on MNIST-5k (README "Quickstart"): creates .venv when missing, then runs every step.
DEMO_OUT ?= outputs/demo
demo: $(STAMP)
	$(VENV)/bin/diffusion-pl demo --out_dir $(DEMO_OUT) $(DEMO_ARGS)

# Every benchmark (U-Net training/inference, guided sampling, Inception evaluation; ours vs the reference) ->
# rewrites BENCHMARKS.md. ~20 min on 2 idle cores; BENCH_ARGS=--quick for a smoke run.
bench: $(STAMP)
	BENCH_COMMAND='make bench$(if $(BENCH_ARGS), BENCH_ARGS="$(BENCH_ARGS)")' $(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check diffusion_pl tests benchmarks

clean-venv:
	rm -rf $(VENV)

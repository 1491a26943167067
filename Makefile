# `make demo` and `make test` work in a fresh clone: they create .venv when it is missing and install what they need.
#   make demo: the project alone (`pip install -e .`), then the quickstart (docs/QUICKSTART.md).
#   make test: + the dev extra (pytest, ruff) + the parity oracle, pinned by hash (tests/oracle-requirements.txt),
#              then the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ORACLE := tests/oracle-requirements.txt

.PHONY: test lint demo bench venv venv-dev clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# The package and the `diffusion-pl` command, without development extras.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -e .
	touch $(STAMP)

# + pytest and ruff, and the reference implementation the parity tests and benchmarks compare against (one exact
# file, checked by its SHA-256; --no-deps: see the comment in $(ORACLE)).
$(DEV_STAMP): $(STAMP) $(ORACLE)
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps --require-hashes -r $(ORACLE)
	touch $(DEV_STAMP)

venv: $(STAMP)
venv-dev: $(DEV_STAMP)

test: $(DEV_STAMP)
	$(PY) -m pytest -q tests

# The quickstart end to end on MNIST-5k (docs/QUICKSTART.md): creates .venv when missing, then runs every step.
DEMO_OUT ?= outputs/demo
demo: $(STAMP)
	$(VENV)/bin/diffusion-pl demo --out_dir $(DEMO_OUT) $(DEMO_ARGS)

# Every benchmark (U-Net training/inference, guided sampling, Inception evaluation; ours vs the reference) ->
# rewrites BENCHMARKS.md. ~20 min on 2 idle cores; BENCH_ARGS=--quick for a smoke run.
bench: $(DEV_STAMP)
	BENCH_COMMAND='make bench$(if $(BENCH_ARGS), BENCH_ARGS="$(BENCH_ARGS)")' $(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check diffusion_pl tests benchmarks

clean-venv:
	rm -rf $(VENV)

# The two commands of the README. Each one sets up what it needs first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 4
MPIRUN := mpirun --oversubscribe $(if $(filter 0,$(shell id -u)),--allow-run-as-root)

.PHONY: setup train test bench clean

setup:
	@bash scripts/setup-env.sh

train: setup
	OMP_NUM_THREADS=1 $(MPIRUN) -np $(NP) $(PY) -m hpcbnn.train $(ARGS)

# Lint, format and types before the suite; pytest lists the slowest tests at the end.
test: setup
	$(PY) -m ruff check hpcbnn
	$(PY) -m ruff format --check hpcbnn
	$(PY) -m mypy
	$(PY) -m pytest -ra --durations=30 $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.layers

clean:
	rm -rf runs .pytest_cache

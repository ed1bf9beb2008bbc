# Every target sets itself up: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help test lint demo bench-wal bench-replication bench bench-deps chaos fuzz clean

# `make` alone lists the targets (the first target is the default).
help:
	@echo "make test               set everything up, then run the whole suite (PYTEST_ARGS=...)"
	@echo "make demo               a leader and two readers on this machine, checked entry by entry"
	@echo "make lint               ruff check and ruff format --check"
	@echo "make bench              every benchmark next to its baseline (BENCH_ARGS=--quick)"
	@echo "make bench-wal          the local WAL alone"
	@echo "make bench-replication  replicated throughput alone"
	@echo "make chaos              faults under load, then the history check (CHAOS_ARGS=...)"
	@echo "make fuzz               the decoders under 50 000 generated inputs each"
	@echo "make clean              remove the virtualenv and everything built or cached"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml setup.py node/_scan.c
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-wal: $(STAMP)
	$(BIN)/python scripts/bench_wal.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache node/*.so

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench-replication: $(STAMP)
	$(BIN)/python scripts/bench_replication.py

# Redis is only a baseline: if it cannot be installed, `make bench` says so and skips that row.
bench-deps:
	@command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || \
		(apt-get update && apt-get install -y redis-server) || \
		echo "bench-deps: could not install redis-server; the Redis baseline will be skipped"

# Everything measured next to its baseline; BENCH_ARGS=--quick for a 1-2 minute run.
bench: $(STAMP) bench-deps
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

fuzz: $(STAMP)
	WALREP_FUZZ_EXAMPLES=50000 $(BIN)/python -m pytest -q tests/unit/test_fuzz.py

# Fault injection under load (root: network namespaces, nftables, tmpfs); CHAOS_ARGS="--seconds 600 --seed 1".
.PHONY: chaos
chaos: $(STAMP)
	$(BIN)/python scripts/chaos.py $(CHAOS_ARGS)

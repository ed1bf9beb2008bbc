# Every target sets itself up: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench-wal bench-replication clean

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
	rm -rf $(VENV) build *.egg-info .pytest_cache node/*.so

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench-replication: $(STAMP)
	$(BIN)/python scripts/bench_replication.py

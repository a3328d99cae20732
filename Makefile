# FaceAge: set-up, tests, pipeline. Every target works on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup test test-unit repro bento serve bench clean

# Creates .venv and installs the project with its test tools (idempotent).
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# All tests: unit + integration (integration tests that need ../shared skip without it).
test: setup
	$(BIN)/python -m pytest

# The quick loop while working.
test-unit: setup
	$(BIN)/python -m pytest -m 'not integration'

repro: setup
	$(BIN)/dvc repro

# --- service (bento) ---
bento: setup
	$(BIN)/python stages/package.py
	$(BIN)/bentoml build

serve: setup
	$(BIN)/bentoml serve face_age:latest

bench: setup
	$(BIN)/python benchmarks/bench_service.py

clean:
	rm -rf .pytest_cache

# The two set-up commands of the README: `make quickstart` (install + run the main job on the embedded
# default) and `make test` (install + run the test suite). Everything else is a helper of these.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the torch CPU build; a machine with an NVIDIA driver resolves torch normally (CUDA build).
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/cpu.txt)

.PHONY: install install-test quickstart test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[test]'

quickstart: install
	$(BIN)/vlp quickstart

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) quickstart mlruns mlflow.db

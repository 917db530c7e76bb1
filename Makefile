# The two set-up commands of the README: `make quickstart` (install + run the main job on the embedded
# default) and `make test` (install + run the test suite). Everything else is a helper of these;
# `make lock` regenerates the locks they install from.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Installs take every version from a lock (pyproject.toml keeps the ranges): the CPU lock (torch's
# 2.13.0 CPU build, no CUDA packages) on a machine without an NVIDIA driver, the CUDA lock with one.
LOCK := constraints/lock-$(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu).txt
# `make lock`: uv's resolver, for Python 3.11 on linux x86_64. The CPU lock takes torch's CPU build
# from TORCH_CPU_WHEELS (pip's find-links on the project's machines); the CUDA lock takes PyPI's torch.
# Versions already locked are kept where they still fit; `make lock LOCK_FLAGS=--upgrade` moves all.
UV_VERSION ?= 0.13.10
TORCH_CPU_WHEELS ?= /opt/wheels
LOCK_FLAGS ?=
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command 'make lock' --quiet $(LOCK_FLAGS)

.PHONY: install install-test quickstart test lock bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -c $(LOCK) -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[test]'

quickstart: install
	$(BIN)/vlp quickstart

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# On a GPU machine: the gpu tests, training throughput and MFU, input headroom (benchmarks/gpu_check.py).
# It runs on the machine's own Python and torch (GPU machines have no network for an install):
# GPU_PYTHON=python3 by default; `make gpu-check GPU_PYTHON=.venv/bin/python` where the venv has CUDA.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py

lock: $(BIN)/python
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(UV_COMPILE) -c constraints/cpu.txt --find-links $(TORCH_CPU_WHEELS) -o constraints/lock-cpu.txt
	$(UV_COMPILE) -o constraints/lock-cuda.txt

clean:
	rm -rf $(VENV) quickstart mlruns mlflow.db

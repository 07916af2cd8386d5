# slimloop: `make demo` runs the whole pipeline on the embedded synthetic dataset,
# `make test` runs the test suite. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# This machine serves these two from disk to plain pip; other machines download them.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

# Keep every run offline and quiet: no telemetry, no update checks.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export MPLBACKEND := Agg
# dvc runs each stage's `python -m flows.<stage>` with this PATH: the venv's python first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test install install-dev lint clean-venv help

help:
	@echo "make demo   - create .venv, install, run 'dvc repro' on the embedded default"
	@echo "make test   - create .venv, install with dev extras, run pytest"
	@echo "make lint   - ruff"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e .
	@touch $@

# the yolov5 interop tests: the yolov5 package without its declared dependencies (they pull
# opencv-python, which conflicts with opencv-python-headless); these are all its model, export and
# val code import beyond ours (docs/yolov5.md, "Dependencies")
YOLOV5_TEST_PINS ?= yolov5==7.0.14 ultralytics==8.4.190 seaborn==0.13.2 setuptools==80.9.0

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(YOLOV5_TEST_PINS)
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/dvc repro

test: install-dev
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check src flows tests benchmarks

clean-venv:
	rm -rf $(VENV)

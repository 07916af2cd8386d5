# slimloop: `make demo` runs the whole pipeline on the embedded synthetic dataset,
# `make test` runs the test suite. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Every package comes from a lock with hashes (requirements/*.lock, torch 2.14.1 and torchvision
# 0.29.1 among them); `make lock` refreshes both locks from pyproject.toml.
LOCK := requirements/runtime.lock
DEV_LOCK := requirements/dev.lock
YOLOV5_LOCK := requirements/yolov5.lock
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml requirements/build.in --universal \
	--python-version 3.11 --generate-hashes -q --custom-compile-command "make lock"

# Keep every run offline and quiet: no telemetry, no update checks.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export MPLBACKEND := Agg
# dvc runs each stage's `python -m flows.<stage>` with this PATH: the venv's python first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test install install-dev lint lock clean-venv help

help:
	@echo "make demo   - create .venv, install, run 'dvc repro' on the embedded default"
	@echo "make test   - create .venv, install with dev extras, run pytest"
	@echo "make lint   - ruff"
	@echo "make lock   - re-resolve requirements/*.lock from pyproject.toml (then make test)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip --version

# The yolov5 interop packages (requirements/yolov5.lock) declare dependencies they are installed
# without; a venv that has them is cleared of them before any `pip check`, so re-installing after
# a lock change passes the check it would pass in a fresh venv.
YOLOV5_PKGS = $$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' $(YOLOV5_LOCK))
UNINSTALL_YOLOV5 = $(PIP) uninstall -q -y $(YOLOV5_PKGS) 2>/dev/null || true

# --no-deps: the lock is complete, so pip installs exactly it; `pip check` proves it consistent.
$(VENV)/.installed: $(LOCK) pyproject.toml | $(PY)
	@$(UNINSTALL_YOLOV5)
	$(PIP) install -q --require-hashes --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
	@rm -f $(VENV)/.installed-dev
	@touch $@

# After `pip check`: the yolov5 interop tests' packages, without their declared dependencies
# (requirements/yolov5.in says why), so their unmet declarations do not fail the check.
$(VENV)/.installed-dev: $(DEV_LOCK) $(YOLOV5_LOCK) pyproject.toml | $(PY)
	@$(UNINSTALL_YOLOV5)
	$(PIP) install -q --require-hashes --no-deps -r $(DEV_LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
	$(PIP) install -q --require-hashes --no-deps -r $(YOLOV5_LOCK)
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/dvc repro

# One pytest worker per core (each with a share of the torch threads, see tests/conftest.py); a
# file's tests stay on one worker, so its module fixtures are built once.
test: install-dev
	$(PY) -m pytest -n auto --dist loadfile

lint: install-dev
	$(VENV)/bin/ruff check src flows tests benchmarks

lock: install-dev
	$(UV_COMPILE) -o $(LOCK)
	$(UV_COMPILE) --extra dev -o $(DEV_LOCK)
	$(VENV)/bin/uv pip compile requirements/yolov5.in --no-deps --universal --python-version 3.11 \
		--generate-hashes -q --custom-compile-command "make lock" -o $(YOLOV5_LOCK)

clean-venv:
	rm -rf $(VENV)

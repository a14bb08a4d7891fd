# deltayolo: `make run` runs the demo, `make test` runs the checks and tests. Both set everything up first
# (idempotent): system packages (Debian/Ubuntu), a virtualenv in .venv, the model and video fetched by hash.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
APT_PACKAGES := mosquitto mosquitto-clients chromium
export ORT_DISABLE_TELEMETRY := 1
export MALLOC_MMAP_THRESHOLD_ := 536870912
export MALLOC_TRIM_THRESHOLD_ := 1073741824

.PHONY: run test lint typecheck setup system-deps data bench clean

run: setup data
	$(BIN)/deltayolo run --config configs/demo.yaml

test: setup system-deps data lint
	$(BIN)/python -m pytest -q -m "not gpu" tests

lint: setup
	$(BIN)/ruff check daemon cluster tests
	$(BIN)/mypy

bench: setup data
	$(BIN)/deltayolo bench cpu --cameras 1 4 8 --seconds 20

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "deltayolo needs Python >= 3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: apt-get install python3-venv" >&2; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,cluster]'
	@touch $@

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

data: setup
	$(BIN)/deltayolo models fetch

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

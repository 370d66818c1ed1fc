# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit system-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Docker engine, PostgreSQL server binaries and a static busybox for the locally built images.
system-deps:
	bash scripts/ensure-system-deps.sh
	bash scripts/ensure-docker.sh

demo: install
	bash scripts/ensure-system-deps.sh demo
	bash scripts/ensure-docker.sh
	$(BIN)/python -m examples.demo

test: install system-deps
	$(BIN)/python -m pytest -q tests

unit: install
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .mmanager *.egg-info .pytest_cache

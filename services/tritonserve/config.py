"""Triton launcher settings (prefix ``LLMFABRIC_TRITONSERVE_``)."""

from __future__ import annotations

import dataclasses

from llmfabric.runtime.config import ConfigError, setting

PREFIX = "LLMFABRIC_TRITONSERVE_"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TritonServeConfig:
    """A tritonserver (through PyTriton) serving the embedded llama.cpp engine
    as one decoupled model with the vLLM backend's tensor names."""

    host: str = setting("127.0.0.1", help="address Triton's gRPC, HTTP and metrics endpoints bind")
    grpc_port: int = setting(8001, help="Triton gRPC port (what workers' LLMFABRIC_WORKER_TRITON_URL points at)")
    http_port: int = setting(8000, help="Triton HTTP port (/v2/health/ready, /v2/models/<name>/ready)")
    metrics_port: int = setting(8002, help="Triton Prometheus metrics port (-1 disables)")
    model_name: str = setting("llmfabric_llm", help="Triton model name of the decoupled LLM model")
    context_length: int = setting(2048, help="tokens per sequence (prompt + answer)")
    capacity: int = setting(4, help="sequences the embedded engine decodes together")
    max_waiting: int = setting(64, help="requests allowed to wait for a free sequence slot")
    n_batch: int = setting(512, help="tokens per llama_decode call")
    n_threads: int = setting(1, help="llama.cpp threads for single-token decode")
    n_threads_batch: int = setting(0, help="llama.cpp threads for prompt processing and batched decode (0 = all cores)")
    weights: str = setting("q8_0", help="weights format, as the embedded workers': q8_0 (re-encoded once) or original")
    workspace: str = setting("", help="PyTriton workspace directory, created at start (default: a fresh temporary one)")
    triton_log_verbose: int = setting(0, help="tritonserver --log-verbose level")
    drain_seconds: float = setting(10.0, help="on SIGTERM, seconds Triton waits for in-flight requests")
    startup_timeout: float = setting(300.0, help="seconds to wait for Triton and the model to be ready")
    log_level: str = setting("info", help="debug, info, warning or error")

    def validate(self) -> None:
        for name in ("grpc_port", "http_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)}: must be a port in 1..65535")
        if self.metrics_port != -1 and not 1 <= self.metrics_port <= 65535:
            raise ConfigError(f"{PREFIX}METRICS_PORT={self.metrics_port}: must be a port in 1..65535 or -1")
        ports = [p for p in (self.grpc_port, self.http_port, self.metrics_port) if p != -1]
        if len(set(ports)) != len(ports):
            raise ConfigError(f"{PREFIX}GRPC_PORT, HTTP_PORT and METRICS_PORT must differ")
        if not self.model_name or not all(c.isalnum() or c in "._-" for c in self.model_name):
            raise ConfigError(f"{PREFIX}MODEL_NAME={self.model_name!r}: letters, digits, '.', '_' and '-' only")
        for name, low in (("context_length", 16), ("capacity", 1), ("max_waiting", 0), ("n_batch", 32),
                          ("n_threads", 1), ("n_threads_batch", 0), ("triton_log_verbose", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)}: must be at least {low}")
        if self.weights not in ("original", "q8_0"):
            raise ConfigError(f"{PREFIX}WEIGHTS={self.weights!r}: must be original or q8_0")
        for name in ("drain_seconds", "startup_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)}: must be positive")

"""Prometheus metrics: one registry per service instance (no globals, so
several services can live in one test process) and its /metrics endpoint."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RpcMetrics:
    """Counters and latency of the gRPC methods a service serves."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.requests = Counter(
            "llmfabric_rpc_requests",
            "RPCs handled, by method and final status code",
            ["service", "method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "llmfabric_rpc_duration_seconds",
            "RPC duration from first byte in to status out",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.service = service

    def observe(self, method: str, code: str, seconds: float) -> None:
        short = method.rsplit("/", 1)[-1]
        self.requests.labels(self.service, short, code).inc()
        self.latency.labels(self.service, short).observe(seconds)


class MetricsEndpoint:
    """Serves ``registry`` at http://host:port/metrics from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.registry = registry
        self.host = host
        self.port = port

    def start(self) -> int:
        if self.port < 0:
            return -1
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_port
        log.info("metrics endpoint listening", extra={"address": f"{self.host}:{self.port}"})
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

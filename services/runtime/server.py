"""gRPC server bootstrap shared by every service.

``ServiceHost`` owns one grpc.aio server with the error/metrics interceptor,
grpc.health.v1 (every service NOT_SERVING until ``set_serving(True)`` and
again while draining; "liveness" SERVING throughout), reflection and the Prometheus endpoint.
``run_service`` is the process entry: JSON logs, start, SIGTERM/SIGINT →
drain within ``drain_seconds`` → exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from .config import ServerSettings
from .interceptors import ServiceInterceptor
from .logs import setup_logging
from .metrics import MetricsEndpoint, RpcMetrics

log = logging.getLogger(__name__)

# grpc.health.v1 service name that is SERVING from start to exit, whatever the
# readiness: Kubernetes liveness probes ask for it, so loading or draining a
# service (overall status NOT_SERVING) never gets it restarted.
LIVENESS = "liveness"

GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


class ServiceHost:
    """A gRPC server plus health, reflection and metrics for one service."""

    def __init__(self, name: str, settings: ServerSettings, registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.server = grpc.aio.server(
            interceptors=[ServiceInterceptor(RpcMetrics(self.registry, name))], options=GRPC_OPTIONS
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.metrics = MetricsEndpoint(self.registry, settings.host, settings.metrics_port)
        self.service_names: list[str] = []
        self.port = 0
        self.draining = False

    def add(self, full_name: str, adder: Callable[[Any, grpc.aio.Server], None], servicer: Any) -> None:
        """Register ``servicer`` under its fully-qualified service name."""
        adder(servicer, self.server)
        self.service_names.append(full_name)

    async def start(self) -> int:
        """Bind, start serving (health NOT_SERVING) and return the gRPC port."""
        names = [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind gRPC port {address}")
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        self.metrics.start()
        log.info(
            "grpc server listening",
            extra={"address": f"{self.settings.host}:{self.port}", "metrics_port": self.metrics.port},
        )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Flip grpc.health.v1 for the overall server and each service."""
        if self.draining and serving:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._set_all(status)
        log.info("health %s", "SERVING" if serving else "NOT_SERVING")

    async def _set_all(self, status: int) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def drain(self, grace: float | None = None) -> None:
        """Stop taking new RPCs, let in-flight ones finish within ``grace``."""
        if self.draining:
            return
        self.draining = True
        grace = self.settings.drain_seconds if grace is None else grace
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining", extra={"grace_seconds": grace})
        await self.server.stop(grace)
        self.metrics.stop()
        log.info("stopped")


async def serve_until_signalled(
    host: ServiceHost,
    ready: Callable[[], Awaitable[None]] | None = None,
    shutdown: Callable[[], Awaitable[None]] | None = None,
    drain_also: Callable[[], Awaitable[None]] | None = None,
    announce: Callable[[], Awaitable[None]] | None = None,
    withdraw: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Start ``host``, run ``ready`` (load models...), mark it SERVING and
    ``announce`` it (Consul registration); on SIGTERM/SIGINT ``withdraw`` it
    first, then drain (``drain_also`` runs alongside, e.g. an HTTP server's
    own graceful stop) and then run ``shutdown``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await host.start()
    try:
        if ready is not None:
            ready_task = asyncio.ensure_future(ready())
            stop_task = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({ready_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if ready_task in done:
                ready_task.result()  # a failed load stops the process with its error
            else:
                ready_task.cancel()
        if not stop.is_set():
            await host.set_serving(True)
            if announce is not None:
                await announce()
            await stop.wait()
        log.info("signal received")
    finally:
        if withdraw is not None:
            await withdraw()
        await asyncio.gather(host.drain(), *([drain_also()] if drain_also is not None else []))
        if shutdown is not None:
            await shutdown()


def run_service(name: str, settings: ServerSettings, main: Callable[[], Awaitable[None]]) -> None:
    """Process entry point shared by every service's ``__main__``."""
    setup_logging(name, settings.log_level)
    try:
        asyncio.run(main())
    except Exception:  # noqa: BLE001 - last resort: log why the process dies
        log.exception("%s failed", name)
        raise SystemExit(1) from None

"""Where the frontends are, as the control plane renders them into endpoints.

Two sources with one shape: a static list (``llmfabric up`` without Consul:
the same ADS path runs everywhere) and Consul (the passing instances of the
``frontend`` service; its OpenAI HTTP port comes from the ``http_port`` meta).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from llmfabric.runtime.consul import Instance, ServiceWatch
from llmfabric.runtime.upstream import parse_target

log = logging.getLogger(__name__)

HostPort = tuple[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Backends:
    """The frontends' gRPC and OpenAI HTTP listeners, sorted (stable versions)."""

    grpc: tuple[HostPort, ...] = ()  # public InferenceService
    http: tuple[HostPort, ...] = ()  # OpenAI-compatible HTTP


def _split(addr: str) -> HostPort:
    host, _, port = addr.rpartition(":")
    return host, int(port)


class StaticCatalog:
    """Fixed frontend addresses."""

    def __init__(self, grpc: str, http: str) -> None:
        g = parse_target(grpc, "frontend gRPC")
        h = parse_target(http, "frontend HTTP")
        if g.consul_service or h.consul_service:
            raise ValueError("StaticCatalog takes host:port lists")
        self.backends = Backends(tuple(sorted(map(_split, g.addresses))), tuple(sorted(map(_split, h.addresses))))

    def subscribe(self, callback: Callable[[Backends], None]) -> None:
        """A static list never changes."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def backends_of(instances: list[Instance]) -> Backends:
    """gRPC = the registered port; HTTP = the ``http_port`` meta (instances without one serve gRPC only)."""
    grpc, http = [], []
    for i in instances:
        grpc.append((i.address, i.port))
        port = i.meta.get("http_port", "")
        if port.isdigit() and 0 < int(port) < 65536:
            http.append((i.address, int(port)))
        else:
            log.warning("frontend instance has no usable http_port meta; gRPC only", extra={"instance": i.id})
    return Backends(tuple(sorted(grpc)), tuple(sorted(http)))


class ConsulCatalog:
    """The passing instances of the frontend service in Consul."""

    def __init__(self, consul_url: str, service: str = "frontend") -> None:
        self.watch = ServiceWatch(consul_url, service)
        self.backends = Backends()
        self._listeners: list[Callable[[Backends], None]] = []
        self.watch.subscribe(self._changed)

    def _changed(self, instances: list[Instance]) -> None:
        self.backends = backends_of(instances)
        for callback in self._listeners:
            callback(self.backends)

    def subscribe(self, callback: Callable[[Backends], None]) -> None:
        self._listeners.append(callback)

    async def start(self) -> None:
        await self.watch.start()

    async def close(self) -> None:
        await self.watch.close()

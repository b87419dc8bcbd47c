"""Where workers are: a static list, or the passing instances of a service
in Consul (endpoints + a change notification)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from llmfabric.runtime.consul import Instance, ServiceWatch
from llmfabric.runtime.upstream import parse_target


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """A worker address as discovery reports it."""

    address: str  # host:port of its gRPC server
    id: str = ""  # discovery's id for it ("" = learn it from GetInfo)


class Discovery(Protocol):
    """A source of worker endpoints."""

    def endpoints(self) -> list[Endpoint]:
        """The current set."""

    def subscribe(self, callback: Callable[[list[Endpoint]], None]) -> None:
        """Call ``callback`` with the new set whenever it changes."""


class StaticDiscovery:
    """A fixed list of ``host:port`` addresses."""

    def __init__(self, addresses: tuple[str, ...] | list[str]) -> None:
        for addr in addresses:
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"worker address {addr!r} is not host:port")
        self._endpoints = [Endpoint(a) for a in addresses]

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    def subscribe(self, callback: Callable[[list[Endpoint]], None]) -> None:
        """A static list never changes."""


class ConsulDiscovery:
    """The passing instances of ``service`` in Consul, followed by a blocking-query watch."""

    def __init__(self, consul_url: str, service: str) -> None:
        self.watch = ServiceWatch(consul_url, service)

    async def start(self) -> None:
        await self.watch.start()

    async def close(self) -> None:
        await self.watch.close()

    def endpoints(self) -> list[Endpoint]:
        return _endpoints(self.watch.instances)

    def subscribe(self, callback: Callable[[list[Endpoint]], None]) -> None:
        self.watch.subscribe(lambda instances: callback(_endpoints(instances)))


def _endpoints(instances: list[Instance]) -> list[Endpoint]:
    return [Endpoint(i.target, i.id) for i in instances]


def from_config(workers: tuple[str, ...], consul_url: str) -> StaticDiscovery | ConsulDiscovery:
    """``consul:<service>`` follows Consul; anything else is a static list."""
    target = parse_target(",".join(workers), "workers")
    if target.consul_service:
        return ConsulDiscovery(consul_url, target.consul_service)
    return StaticDiscovery(target.addresses)

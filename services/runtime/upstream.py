"""Clients of another service: one channel per instance, round robin.

A target is either a static ``host:port`` list (comma-separated) or
``consul:<service>``: the passing instances of that service in Consul, kept
current by a :class:`~llmfabric.runtime.consul.ServiceWatch`. A vanished
instance's channel is closed only after its in-flight calls had time to end
(``retire_grace``), so a scale-down never cuts a running stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from .config import ConfigError
from .consul import PREFIX, ServiceWatch
from .errors import Unavailable
from .server import GRPC_OPTIONS

log = logging.getLogger(__name__)

S = TypeVar("S")


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where a service is: fixed addresses, or a Consul service name."""

    addresses: tuple[str, ...] = ()  # host:port each (static)
    consul_service: str = ""  # watch this service in Consul instead


def parse_target(value: str, what: str) -> Target:
    """``host:port[,host:port...]`` or ``consul:<service>``; ValueError naming ``what``."""
    value = value.strip()
    if value.startswith(PREFIX):
        name = value[len(PREFIX):].strip()
        if not name or "/" in name or "?" in name:
            raise ValueError(f"{what}={value!r}: expected consul:<service-name>")
        return Target(consul_service=name)
    addresses = tuple(a.strip() for a in value.split(",") if a.strip())
    if not addresses:
        raise ValueError(f"{what} is empty: expected host:port or consul:<service>")
    for addr in addresses:
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{what}={value!r}: {addr!r} is not host:port (or use consul:<service>)")
    return Target(addresses=addresses)


def config_target(prefix: str, field: str, value: str, consul_url: str) -> Target:
    """:func:`parse_target` for a setting: a ConfigError naming ``<prefix><FIELD>``,
    and ``<prefix>CONSUL`` when a ``consul:`` target has no agent to ask."""
    what = f"{prefix}{field.upper()}"
    try:
        target = parse_target(value, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if target.consul_service and not consul_url:
        raise ConfigError(f"{what}={value!r} needs {prefix}CONSUL (the agent's address)")
    return target


class Upstream(Generic[S]):
    """Stubs of one service, spread round robin over its instances."""

    def __init__(self, what: str, target: str, stub: Callable[[grpc.aio.Channel], S], *,
                 consul_url: str = "", retire_grace: float = 600.0) -> None:
        self.what = what
        self.target = parse_target(target, what)
        if self.target.consul_service and not consul_url:
            raise ValueError(f"{what}={target!r} needs a Consul address (the service's CONSUL setting)")
        self._make_stub = stub
        self._stubs: dict[str, tuple[grpc.aio.Channel, S]] = {}
        self._order: list[str] = []
        self._cycle = itertools.count()
        self._retiring: set[asyncio.Task] = set()
        self.retire_grace = retire_grace
        self.watch = ServiceWatch(consul_url, self.target.consul_service) if self.target.consul_service else None
        if self.watch is None:
            self._set(list(self.target.addresses))

    async def start(self) -> None:
        """Begin following Consul (a static target is ready at once)."""
        if self.watch is not None:
            self.watch.subscribe(lambda instances: self._set([i.target for i in instances]))
            await self.watch.start()

    def addresses(self) -> list[str]:
        return list(self._order)

    def _set(self, addresses: list[str]) -> None:
        for addr in addresses:
            if addr not in self._stubs:
                channel = grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS)
                self._stubs[addr] = (channel, self._make_stub(channel))
        for addr in [a for a in self._stubs if a not in addresses]:
            channel, _ = self._stubs.pop(addr)
            task = asyncio.get_running_loop().create_task(channel.close(grace=self.retire_grace))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self._order = list(addresses)
        log.info("upstream instances", extra={"upstream": self.what, "instances": self._order})

    def stub(self) -> S:
        """The next instance's stub; UNAVAILABLE when none is healthy."""
        if not self._order:
            raise Unavailable(f"no healthy {self.what} instance")
        addr = self._order[next(self._cycle) % len(self._order)]
        return self._stubs[addr][1]

    async def close(self) -> None:
        if self.watch is not None:
            await self.watch.close()
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
        self._order = []
        for task in list(self._retiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

"""Where workers are. A static list now; Consul implements the same
interface later (endpoints + a change notification)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol


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

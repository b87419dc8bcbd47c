"""Consul: register this service, and watch the healthy instances of others.

Registration (:class:`Registration`) puts the service in the local agent's
catalog with a native gRPC health check against its grpc.health.v1 endpoint
and ``DeregisterCriticalServiceAfter`` (a crashed process leaves the catalog
by itself); it deregisters on graceful shutdown and registers again when the
agent forgot it (an agent restart without persisted state).

A watch (:class:`ServiceWatch`) runs Consul's blocking query
``GET /v1/health/service/<name>?passing&index=N&wait=W`` in a loop: it returns
at once when the index moved, or after ``wait`` with no change; a return does
not mean a change, so callers hear only real changes. On errors it backs off
with jitter and keeps the last known healthy set (an unreachable Consul must
not empty a pool). An index that goes backwards (the agent restarted) resets
the query; an index below 1 is treated as 1, as Consul's docs ask. Right
after an outage or an index reset, an empty answer is not believed for
``reconnect_grace`` seconds: a restarted agent that lost its state lists
nothing until the services re-register (within their resync interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
import time
import urllib.parse
from collections.abc import Callable, Mapping

import consul
import consul.aio

log = logging.getLogger(__name__)

PREFIX = "consul:"  # a target "consul:<service>" means: watch that service in Consul


@dataclasses.dataclass(frozen=True, slots=True)
class Instance:
    """One healthy instance of a service as Consul lists it."""

    id: str  # Consul service id (unique per instance)
    address: str  # host it is reached at
    port: int  # its gRPC port
    tags: tuple[str, ...] = ()  # Consul tags
    meta: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Consul service meta

    @property
    def target(self) -> str:
        """``host:port`` for a gRPC channel."""
        return f"{self.address}:{self.port}"


def client(url: str) -> consul.aio.Consul:
    """A py-consul asyncio client for an agent at ``http(s)://host:port``."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        raise ValueError(f"Consul address {url!r} is not http://host:port")
    return consul.aio.Consul(host=parts.hostname, port=parts.port or 8500, scheme=parts.scheme or "http")


async def close_client(agent: consul.aio.Consul) -> None:
    """Close a client's HTTP session (py-consul has no close())."""
    with contextlib.suppress(Exception):
        await agent.http._session.close()


def advertised_host(bind_host: str) -> str:
    """The address others reach a server bound to ``bind_host`` at."""
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


def _backoff(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(base / 2, min(cap, base * 2**attempt))


class Registration:
    """This process's entry in the local Consul agent."""

    def __init__(
        self,
        consul_url: str,
        name: str,
        address: str,
        port: int,
        *,
        tags: tuple[str, ...] = (),
        meta: Mapping[str, str] | None = None,
        check_interval: str = "1s",
        check_timeout: str = "2s",
        deregister_after: str = "1m",
        resync_seconds: float = 5.0,
    ) -> None:
        self.url = consul_url
        self.name = name
        self.address = address
        self.port = port
        self.service_id = f"{name}-{address}-{port}"
        self.tags = tags
        self.meta = dict(meta or {})
        self.check_interval = check_interval
        self.check_timeout = check_timeout
        self.deregister_after = deregister_after
        self.resync_seconds = resync_seconds
        self._client: consul.aio.Consul | None = None
        self._task: asyncio.Task | None = None
        self.registrations = 0  # times we (re-)registered

    async def start(self) -> None:
        """Register (retrying until the agent answers), then keep it registered."""
        self._client = client(self.url)
        self._task = asyncio.create_task(self._keep(), name=f"consul-register-{self.name}")

    async def _register(self) -> None:
        assert self._client is not None
        check = consul.Check.grpc(
            f"{self.address}:{self.port}", self.check_interval, timeout=self.check_timeout,
            deregister=self.deregister_after,
        )
        ok = await self._client.agent.service.register(
            self.name, service_id=self.service_id, address=self.address, port=self.port,
            tags=list(self.tags), meta=self.meta, check=check,
        )
        if not ok:
            raise RuntimeError("the agent did not accept the registration")
        self.registrations += 1
        log.info("registered in consul", extra={"service": self.name, "service_id": self.service_id,
                                                "consul": self.url, "times": self.registrations})

    async def _keep(self) -> None:
        """Register, then check every ``resync_seconds`` that the agent still has us."""
        assert self._client is not None
        attempt = 0
        registered = False
        while True:
            try:
                if not registered:
                    await self._register()
                    registered = True
                else:
                    services = await self._client.agent.services()
                    if self.service_id not in services:
                        log.warning("consul forgot this service; registering again",
                                    extra={"service_id": self.service_id})
                        registered = False
                        continue
                attempt = 0
                await asyncio.sleep(self.resync_seconds)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any agent failure: retry with backoff
                delay = _backoff(attempt)
                attempt += 1
                log.warning("consul unreachable; will retry", extra={
                    "consul": self.url, "error": f"{type(exc).__name__}: {exc}", "retry_in_s": round(delay, 2)})
                await asyncio.sleep(delay)

    async def stop(self, timeout: float = 2.0) -> None:
        """Deregister (best effort) so consumers stop sending at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is None:
            return
        try:
            await asyncio.wait_for(self._client.agent.service.deregister(self.service_id), timeout)
            log.info("deregistered from consul", extra={"service_id": self.service_id})
        except Exception as exc:  # noqa: BLE001 - the check's deregister-after cleans up
            log.warning("consul deregistration failed", extra={"service_id": self.service_id, "error": str(exc)})
        finally:
            await close_client(self._client)
            self._client = None


def _instance(entry: Mapping) -> Instance:
    svc, node = entry["Service"], entry.get("Node") or {}
    return Instance(
        id=svc["ID"], address=svc.get("Address") or node.get("Address", ""), port=int(svc["Port"]),
        tags=tuple(svc.get("Tags") or ()), meta=dict(svc.get("Meta") or {}),
    )


class ServiceWatch:
    """The passing instances of one service, kept current by blocking queries."""

    def __init__(self, consul_url: str, service: str, *, wait: str = "30s", tag: str | None = None,
                 reconnect_grace: float = 15.0) -> None:
        self.url = consul_url
        self.reconnect_grace = reconnect_grace  # seconds an empty answer after an outage is not believed
        self._distrust_empty_until = 0.0
        self.service = service
        self.wait = wait
        self.tag = tag
        self.instances: list[Instance] = []
        self.index = 0
        self.errors = 0  # consecutive failed queries
        self._listeners: list[Callable[[list[Instance]], None]] = []
        self._client: consul.aio.Consul | None = None
        self._task: asyncio.Task | None = None
        self._first = asyncio.Event()

    def subscribe(self, callback: Callable[[list[Instance]], None]) -> None:
        """Call ``callback`` with the new set after each real change."""
        self._listeners.append(callback)

    async def start(self, first_timeout: float = 5.0) -> None:
        """Start watching; wait up to ``first_timeout`` for the first answer."""
        self._client = client(self.url)
        self._task = asyncio.create_task(self._run(), name=f"consul-watch-{self.service}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first.wait(), first_timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await close_client(self._client)
            self._client = None

    async def _query(self) -> tuple[int, list[Instance]]:
        assert self._client is not None
        kwargs: dict = {"passing": True}
        if self.index:
            kwargs.update(index=self.index, wait=self.wait)
        if self.tag:
            kwargs["tag"] = self.tag
        index, entries = await self._client.health.service(self.service, **kwargs)
        return int(index or 0), sorted((_instance(e) for e in entries), key=lambda i: i.id)

    async def _run(self) -> None:
        while True:
            try:
                index, instances = await self._query()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the last known set, back off, retry
                delay = _backoff(self.errors)
                self.errors += 1
                log.warning("consul watch failed; keeping the last known instances", extra={
                    "service": self.service, "instances": len(self.instances), "retry_in_s": round(delay, 2),
                    "error": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(delay)
                continue
            if self.errors or index < self.index:
                # Back after an outage, or the index went backwards: the agent may have
                # restarted and lost its state, and services re-register only at their
                # next resync. Until then an empty answer is not believed.
                log.info("consul watch recovered", extra={"service": self.service, "index": index})
                self._distrust_empty_until = time.monotonic() + self.reconnect_grace
            self.errors = 0
            # Went backwards (the agent restarted): start over with a fresh query.
            self.index = 0 if index < self.index else max(index, 1)
            if not instances and self.instances and time.monotonic() < self._distrust_empty_until:
                log.warning("consul lists no instances right after reconnecting; keeping the last known set "
                            "until services re-register", extra={"service": self.service, "instances": len(self.instances)})
                await asyncio.sleep(0.5)  # ask again soon: the next answer may already be the re-registered set
                self.index = 0
                continue
            self._apply(instances)

    def _apply(self, instances: list[Instance]) -> None:
        first = not self._first.is_set()
        self._first.set()
        if instances == self.instances and not first:
            return
        log.info("consul instances changed", extra={
            "service": self.service, "instances": [i.target for i in instances], "index": self.index})
        self.instances = instances
        for callback in self._listeners:
            try:
                callback(list(instances))
            except Exception:
                log.exception("consul watch listener failed", extra={"service": self.service})

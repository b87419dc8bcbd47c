"""The workers the scheduler can dispatch to: their channels, capacity,
in-flight counts and health (from periodic GetLoad probes and call
failures)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import grpc

from llmfabric.runtime.server import GRPC_OPTIONS
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc

from .discovery import Discovery, Endpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True, eq=False)
class WorkerHandle:
    """One worker as the scheduler sees it."""

    address: str  # host:port
    channel: grpc.aio.Channel  # shared by every call to it
    stub: worker_pb2_grpc.WorkerServiceStub  # generated client
    id: str = ""  # from GetInfo
    capacity: int = 1  # concurrent sequences (from GetInfo)
    in_flight: int = 0  # requests the scheduler has running there
    healthy: bool = False  # receives traffic
    load: worker_pb2.GetLoadResponse | None = None  # last report
    consecutive_failures: int = 0  # probe/call failures in a row

    @property
    def has_slot(self) -> bool:
        return self.healthy and self.in_flight < self.capacity


class WorkerPool:
    """Worker handles kept in step with discovery and probed for health."""

    def __init__(self, discovery: Discovery, probe_interval: float = 1.0, probe_timeout: float = 2.0) -> None:
        self.discovery = discovery
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.workers: dict[str, WorkerHandle] = {}
        self.on_change: Callable[[], None] = lambda: None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._apply(self.discovery.endpoints())
        self.discovery.subscribe(self._apply)
        await self.probe_all()
        self._task = asyncio.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for w in self.workers.values():
            await w.channel.close()

    def _apply(self, endpoints: list[Endpoint]) -> None:
        """Add new endpoints; drop vanished ones at once."""
        wanted = {e.address: e for e in endpoints}
        for addr in list(self.workers):
            if addr not in wanted:
                w = self.workers.pop(addr)
                w.healthy = False
                asyncio.get_event_loop().create_task(w.channel.close(grace=30))
                log.info("worker left discovery", extra={"worker": addr})
        for addr, ep in wanted.items():
            if addr not in self.workers:
                channel = grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS)
                self.workers[addr] = WorkerHandle(addr, channel, worker_pb2_grpc.WorkerServiceStub(channel), id=ep.id)
        self.on_change()

    def available(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.has_slot]

    def healthy(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.healthy]

    def mark_failed(self, worker: WorkerHandle, why: str) -> None:
        """A call failed at the transport level: stop routing there until a
        probe succeeds again."""
        worker.consecutive_failures += 1
        if worker.healthy:
            worker.healthy = False
            log.warning("worker marked unhealthy", extra={"worker": worker.address, "reason": why})
        self.on_change()

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(w) for w in list(self.workers.values())))
        self.on_change()

    async def _probe(self, w: WorkerHandle) -> None:
        try:
            if not w.id or w.capacity <= 1:
                info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=self.probe_timeout)
                w.id = w.id or info.worker_id or w.address
                w.capacity = max(info.capacity, 1)
            w.load = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=self.probe_timeout)
        except grpc.aio.AioRpcError as err:
            w.consecutive_failures += 1
            if w.healthy:
                log.warning("worker probe failed", extra={"worker": w.address, "code": err.code().name})
            w.healthy = False
            return
        if not w.healthy:
            log.info("worker healthy", extra={"worker": w.address, "capacity": w.capacity})
        w.healthy = True
        w.consecutive_failures = 0

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.probe_all()
            except Exception:  # noqa: BLE001 - probing must go on
                log.exception("probe round failed")

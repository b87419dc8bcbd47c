"""The workers the scheduler can dispatch to: their channels, capacity,
in-flight counts and health (from periodic GetLoad probes and call
failures), each behind a circuit breaker.

Health and the breaker are separate: ``healthy`` follows the last probe or
call (a transport failure takes a worker out until a probe succeeds), while
the breaker counts call failures in a row and, after ``failures`` of them,
keeps the worker out for ``cooldown`` seconds even if probes pass (a worker
whose probes answer but whose calls fail would otherwise flap in and out of
rotation). After the cool-down it is half-open: one request at a time, and
the first successful probe or call closes it; a failed call reopens it.
Probes keep running whatever the breaker says.

Listeners (the cache-aware router) hear of each load report and of workers
leaving; a probe never resets the scheduler's own in-flight counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import grpc
from llmfabric.runtime.server import GRPC_OPTIONS
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc

from .discovery import Discovery, Endpoint

log = logging.getLogger(__name__)


class BreakerState(str, enum.Enum):
    CLOSED = "closed"  # traffic flows
    OPEN = "open"  # no traffic until the cool-down ends
    HALF_OPEN = "half_open"  # one request at a time until a success closes it


class CircuitBreaker:
    """Consecutive call failures → open for ``cooldown`` s → half-open."""

    def __init__(self, failures: int = 3, cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or cooldown < 0:
            raise ValueError("breaker needs failures >= 1 and cooldown >= 0")
        self.failures = failures  # consecutive call failures that open it
        self.cooldown = cooldown  # seconds open before half-open
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self.consecutive = 0  # call failures since the last success
        self.trips = 0  # times it opened

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown:
            self._state = BreakerState.HALF_OPEN
        return self._state

    def on_failure(self) -> bool:
        """A call failed; returns True if this opened the breaker."""
        self.consecutive += 1
        state = self.state
        if state is BreakerState.HALF_OPEN or (state is BreakerState.CLOSED and self.consecutive >= self.failures):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self.trips += 1
            return True
        return False

    def on_success(self) -> None:
        """A call succeeded, or a probe did after the cool-down."""
        if self.state is not BreakerState.OPEN:
            self._state = BreakerState.CLOSED
            self.consecutive = 0


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
    breaker: CircuitBreaker = dataclasses.field(default_factory=CircuitBreaker)  # call-failure breaker
    restarts: int = 0  # times its counters went backwards (a new process behind the address)

    @property
    def has_slot(self) -> bool:
        if not self.healthy:
            return False
        state = self.breaker.state
        if state is BreakerState.OPEN:
            return False
        limit = 1 if state is BreakerState.HALF_OPEN else self.capacity
        return self.in_flight < limit


@runtime_checkable
class PoolListener(Protocol):
    """Told about load reports and departures (e.g. the cache-aware router)."""

    def worker_load(
        self, worker: WorkerHandle, previous: worker_pb2.GetLoadResponse | None, restarted: bool
    ) -> None: ...

    def worker_removed(self, worker: WorkerHandle) -> None: ...


RETIRE_GRACE = 300.0  # seconds a worker that left discovery keeps its in-flight streams


class WorkerPool:
    """Worker handles kept in step with discovery and probed for health."""

    def __init__(
        self,
        discovery: Discovery,
        probe_interval: float = 1.0,
        probe_timeout: float = 2.0,
        *,
        breaker_failures: int = 3,
        breaker_cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.discovery = discovery
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        self._clock = clock
        CircuitBreaker(breaker_failures, breaker_cooldown)  # fail at construction on bad values
        self.workers: dict[str, WorkerHandle] = {}
        self.on_change: Callable[[], None] = lambda: None
        self.listeners: list[PoolListener] = []
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        start = getattr(self.discovery, "start", None)
        if start is not None:
            await start()
        self._apply(self.discovery.endpoints())
        self.discovery.subscribe(self._apply)
        await self.probe_all()
        self._task = asyncio.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        close = getattr(self.discovery, "close", None)
        if close is not None:
            await close()
        for w in self.workers.values():
            await w.channel.close()

    def _apply(self, endpoints: list[Endpoint]) -> None:
        """Add new endpoints; drop vanished ones at once (their streams get
        ``retire_grace`` seconds to finish before the channel closes)."""
        wanted = {e.address: e for e in endpoints}
        for addr in list(self.workers):
            if addr not in wanted:
                w = self.workers.pop(addr)
                w.healthy = False
                asyncio.get_event_loop().create_task(w.channel.close(grace=RETIRE_GRACE))
                for listener in self.listeners:
                    listener.worker_removed(w)
                log.info("worker left discovery", extra={"worker": addr})
        for addr, ep in wanted.items():
            if addr not in self.workers:
                channel = grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS)
                self.workers[addr] = WorkerHandle(
                    addr, channel, worker_pb2_grpc.WorkerServiceStub(channel), id=ep.id,
                    breaker=CircuitBreaker(self.breaker_failures, self.breaker_cooldown, self._clock),
                )
        self.on_change()

    def available(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.has_slot]

    def healthy(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.healthy]

    def mark_failed(self, worker: WorkerHandle, why: str) -> None:
        """A call failed at the transport level: stop routing there until a
        probe succeeds again (and, after enough failures in a row, until the
        breaker's cool-down has passed)."""
        worker.consecutive_failures += 1
        if worker.breaker.on_failure():
            log.warning("worker circuit open", extra={"worker": worker.address, "reason": why,
                                                       "cooldown": worker.breaker.cooldown})
        if worker.healthy:
            worker.healthy = False
            log.warning("worker marked unhealthy", extra={"worker": worker.address, "reason": why})
        self.on_change()

    def mark_ok(self, worker: WorkerHandle) -> None:
        """A call succeeded: the breaker's failure run ends (closes if half-open)."""
        worker.breaker.on_success()

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(w) for w in list(self.workers.values())))
        self.on_change()

    async def _probe(self, w: WorkerHandle) -> None:
        try:
            if not w.id or w.capacity <= 1:
                info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=self.probe_timeout)
                w.id = w.id or info.worker_id or w.address
                w.capacity = max(info.capacity, 1)
            load = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=self.probe_timeout)
        except grpc.aio.AioRpcError as err:
            w.consecutive_failures += 1
            if w.healthy:
                log.warning("worker probe failed", extra={"worker": w.address, "code": err.code().name})
            w.healthy = False
            return
        previous, w.load = w.load, load
        # Counters only grow in one process: going backwards means a new one.
        restarted = previous is not None and (
            load.prompt_tokens_total < previous.prompt_tokens_total
            or load.evictions_total < previous.evictions_total
        )
        if restarted:
            w.restarts += 1
            log.info("worker restarted (counters reset)", extra={"worker": w.address})
        if not w.healthy:
            log.info("worker healthy", extra={"worker": w.address, "capacity": w.capacity})
        w.healthy = True
        w.consecutive_failures = 0
        if w.breaker.state is BreakerState.HALF_OPEN:
            w.breaker.on_success()  # the half-open probe succeeded
        for listener in self.listeners:
            listener.worker_load(w, previous, restarted)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.probe_all()
            except Exception:  # noqa: BLE001 - probing must go on
                log.exception("probe round failed")

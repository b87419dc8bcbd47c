"""Admission, waiting for a worker slot, and relaying a worker's stream.

``Dispatcher.submit`` is the whole life of a request in the scheduler:
admit (or RESOURCE_EXHAUSTED) → wait in the queue until some worker has a
free slot (bounded by the caller's deadline) → stream from the worker →
release the slot. A worker that fails before the first token is marked
unhealthy and the request is retried elsewhere (``max_retries``); after the
first token the stream ends with UNAVAILABLE. Cancellation at any point
removes the request from the queue or cancels the worker call, which stops
generation on the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc

from llmfabric.convert import chunk_from_pb, request_to_pb
from llmfabric.runtime.context import outgoing_metadata
from llmfabric.runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable, error_from_rpc
from llmfabric.structs import LEVEL_NAMES, TokenChunk, ValidatedRequest, level_of
from llmfabric.worker.v1 import worker_pb2

from .pool import PoolListener, WorkerHandle, WorkerPool
from .metrics import SchedulerMetrics
from .queue import RequestQueue, Waiter
from .router import Router

log = logging.getLogger(__name__)

BATCH_LEVEL = 3  # common.v1.PRIORITY_BATCH: this level and below leave reserved slots free
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


class Dispatcher:
    def __init__(
        self,
        pool: WorkerPool,
        queue: RequestQueue,
        router: Router,
        max_retries: int = 1,
        priority_caps: dict[str, int] | None = None,
        reserved_slots: int = 1,
    ) -> None:
        # slots per worker that batch/background requests may not take, so an
        # interactive or critical request finds a free slot even under a batch
        # flood (running sequences are not preempted)
        self.reserved_slots = reserved_slots
        self.priority_caps = priority_caps or {}  # tenant ("*" = any) -> highest level it may use
        self.metrics: SchedulerMetrics | None = None  # set by the server; None in bare unit tests
        self.policy_name = getattr(router, "policy", type(router).__name__)
        self.pool = pool
        self.queue = queue
        self.router = router
        self.max_retries = max_retries
        pool.on_change = self._dispatch
        if isinstance(router, PoolListener):  # cache-aware: load reports and departures correct its trees
            pool.listeners.append(router)

    @property
    def running(self) -> int:
        return sum(w.in_flight for w in self.pool.workers.values())

    def _dispatch(self) -> None:
        """Hand free worker slots to waiters in queue order."""
        while True:
            candidates = self.pool.available()
            if not candidates:
                break
            waiter = self.queue.peek()
            if waiter is None:
                break
            if waiter.level >= BATCH_LEVEL and self.reserved_slots:
                candidates = [w for w in candidates if w.in_flight < max(w.capacity - self.reserved_slots, 1)]
                if not candidates:
                    break  # only reserved slots are free: they wait for interactive work
            if waiter.exclude:
                others = [w for w in candidates if w not in waiter.exclude]
                if not others and any(w not in waiter.exclude for w in self.pool.healthy()):
                    break  # a retry waits for a slot on a different healthy worker
                candidates = others or candidates
            self.queue.pop()
            if waiter.future.done():
                continue
            worker = self.router.pick(candidates, waiter.request, self.pool.healthy())
            worker.in_flight += 1
            waiter.future.set_result(worker)
            if self.metrics is not None:
                self.metrics.wait.labels(LEVEL_NAMES[waiter.level]).observe(time.monotonic() - waiter.enqueued_at)
                reason = getattr(self.router, "last_reason", None)
                self.metrics.routing.labels(str(self.policy_name), getattr(reason, "value", "policy")).inc()
                self.metrics.in_flight.labels(worker.address).set(worker.in_flight)
        if not self.pool.healthy():
            for waiter in self.queue.drain():
                if not waiter.future.done():
                    waiter.future.set_exception(Unavailable("no healthy worker is available"))

    def _release(self, worker: WorkerHandle) -> None:
        worker.in_flight -= 1
        if self.metrics is not None:
            self.metrics.in_flight.labels(worker.address).set(worker.in_flight)
        self._dispatch()

    async def _lease(
        self, request: ValidatedRequest, timeout: float | None, exclude: frozenset = frozenset()
    ) -> WorkerHandle:
        if not self.pool.healthy():
            raise Unavailable("no healthy worker is available")
        waiter = Waiter(request, asyncio.get_running_loop().create_future(), exclude=exclude)
        try:
            self.queue.push(waiter)
        except ResourceExhausted:
            self._count(request, "rejected")
            raise
        self._count(request, "admitted")
        self._dispatch()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except (asyncio.CancelledError, asyncio.TimeoutError) as exc:
            self.queue.remove(waiter)
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._release(waiter.future.result())  # got a slot just as we gave up
            else:
                waiter.future.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                self._count(request, "expired")
                raise DeadlineExceeded("deadline passed while waiting for a worker") from None
            self._count(request, "cancelled")
            raise

    def _count(self, request: ValidatedRequest, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.outcome(level_of(request.priority), outcome)

    def _capped(self, request: ValidatedRequest) -> ValidatedRequest:
        """The request at most at the priority its tenant is allowed."""
        cap = self.priority_caps.get(request.tenant_id, self.priority_caps.get("*", 1))
        level = level_of(request.priority)
        return request if level >= cap else dataclasses.replace(request, priority=cap)

    async def submit(self, request: ValidatedRequest, timeout: float | None = None) -> AsyncIterator[tuple[TokenChunk, str]]:
        """Yield (chunk, worker id) pairs until the final chunk."""
        request = self._capped(request)
        level = LEVEL_NAMES[level_of(request.priority)]
        start, first, outcome = time.monotonic(), True, "failed"
        dispatched: list[bool] = []  # set once a worker slot was leased (queue-time outcomes are _lease's)
        inner = self._submit(request, timeout, dispatched)
        try:
            async for item in inner:
                if first and self.metrics is not None:
                    self.metrics.ttft.labels(level).observe(time.monotonic() - start)
                first = False
                yield item
            outcome = "completed"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            await inner.aclose()  # cancels the worker call and frees the slot now, not at garbage collection
            if self.metrics is not None and dispatched:
                self.metrics.e2e.labels(level).observe(time.monotonic() - start)
                self._count(request, outcome)

    async def _submit(
        self, request: ValidatedRequest, timeout: float | None, dispatched: list[bool]
    ) -> AsyncIterator[tuple[TokenChunk, str]]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        attempts = 0
        failed: frozenset = frozenset()
        while True:
            worker = await self._lease(request, None if deadline is None else deadline - loop.time(), failed)
            dispatched.append(True)
            started = False
            call = worker.stub.Generate(
                worker_pb2.GenerateRequest(request=request_to_pb(request)),
                timeout=None if deadline is None else max(deadline - loop.time(), 0.001),
                metadata=outgoing_metadata(),
            )
            try:
                async for resp in call:
                    started = True
                    yield chunk_from_pb(resp.chunk), worker.id
                self.pool.mark_ok(worker)  # ends the breaker's failure run
                return
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded("deadline passed while generating") from None
                if code not in _RETRYABLE or code == grpc.StatusCode.INTERNAL and started:
                    raise error_from_rpc(err) from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.pool.mark_failed(worker, err.details() or code.name)
                if started:
                    raise Unavailable(f"worker {worker.id} failed mid-stream: {err.details()}") from None
                attempts += 1
                failed = failed | {worker}
                if attempts > self.max_retries:
                    raise Unavailable(f"worker {worker.id} failed before the first token: {err.details()}") from None
                log.warning("retrying on another worker", extra={"worker": worker.id, "code": code.name})
            finally:
                call.cancel()  # no-op when finished; stops generation when the caller went away
                self._release(worker)

"""Per-worker circuit breaker: open after N call failures in a row, closed
to traffic for a cool-down even while probes pass, then half-open (one
request at a time) until a probe or call succeeds."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import Unavailable
from llmfabric.scheduler.discovery import StaticDiscovery
from llmfabric.scheduler.pool import BreakerState, CircuitBreaker, WorkerHandle, WorkerPool
from llmfabric.worker.v1 import worker_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Stub:
    def __init__(self) -> None:
        self.fail = False

    async def GetInfo(self, req, timeout=None):  # noqa: N802 - gRPC name
        return worker_pb2.GetInfoResponse(worker_id="w", capacity=4)

    async def GetLoad(self, req, timeout=None):  # noqa: N802 - gRPC name
        if self.fail:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        return worker_pb2.GetLoadResponse(capacity=4, kv_free=100)


def _setup(failures: int = 3, cooldown: float = 5.0):
    clock = Clock()
    pool = WorkerPool(StaticDiscovery([]), breaker_failures=failures, breaker_cooldown=cooldown, clock=clock)
    w = WorkerHandle("h:1", channel=None, stub=_Stub(), id="w", capacity=4, healthy=True,
                     breaker=CircuitBreaker(failures, cooldown, clock))
    pool.workers[w.address] = w
    return pool, w, clock


def test_breaker_rejects_bad_settings():
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown=-1)
    with pytest.raises(ValueError):
        WorkerPool(StaticDiscovery([]), breaker_failures=0)


def test_opens_after_n_consecutive_failures():
    pool, w, _ = _setup(failures=3)
    for _ in range(2):
        pool.mark_failed(w, "x")
        w.healthy = True  # a probe brought it back
        assert w.breaker.state is BreakerState.CLOSED and w.has_slot
    pool.mark_failed(w, "x")
    assert w.breaker.state is BreakerState.OPEN and w.breaker.trips == 1
    w.healthy = True
    assert not w.has_slot  # healthy by probe, but the breaker keeps traffic away


def test_a_success_ends_the_failure_run():
    pool, w, _ = _setup(failures=3)
    for _ in range(2):
        pool.mark_failed(w, "x")
    pool.mark_ok(w)
    for _ in range(2):
        pool.mark_failed(w, "x")
    assert w.breaker.state is BreakerState.CLOSED


async def test_probes_keep_running_while_open_and_do_not_close_it_early():
    pool, w, clock = _setup(failures=1, cooldown=5.0)
    pool.mark_failed(w, "x")
    await pool.probe_all()
    assert w.healthy and w.breaker.state is BreakerState.OPEN and not w.has_slot
    clock.now += 4.9
    await pool.probe_all()
    assert w.breaker.state is BreakerState.OPEN and not w.has_slot


async def test_half_open_admits_one_request_and_a_probe_closes_it():
    pool, w, clock = _setup(failures=1, cooldown=5.0)
    pool.mark_failed(w, "x")
    w.healthy = True
    clock.now += 5.0
    assert w.breaker.state is BreakerState.HALF_OPEN
    assert w.has_slot
    w.in_flight = 1  # the trial request
    assert not w.has_slot  # only one at a time while half-open
    await pool.probe_all()  # the worker answers: closed again
    assert w.breaker.state is BreakerState.CLOSED and w.has_slot


def test_half_open_request_success_closes_it():
    pool, w, clock = _setup(failures=1, cooldown=5.0)
    pool.mark_failed(w, "x")
    w.healthy = True
    clock.now += 5.0
    pool.mark_ok(w)
    assert w.breaker.state is BreakerState.CLOSED


def test_half_open_failure_reopens_for_a_new_cooldown():
    pool, w, clock = _setup(failures=3, cooldown=5.0)
    for _ in range(3):
        pool.mark_failed(w, "x")
    clock.now += 5.0
    assert w.breaker.state is BreakerState.HALF_OPEN
    pool.mark_failed(w, "trial failed")  # one failure is enough while half-open
    assert w.breaker.state is BreakerState.OPEN and w.breaker.trips == 2
    clock.now += 4.0
    assert w.breaker.state is BreakerState.OPEN
    clock.now += 1.0
    assert w.breaker.state is BreakerState.HALF_OPEN


def test_success_while_open_does_not_close_it():
    pool, w, clock = _setup(failures=1, cooldown=5.0)
    pool.mark_failed(w, "x")
    pool.mark_ok(w)  # e.g. a stream that was already running finished
    assert w.breaker.state is BreakerState.OPEN


async def test_failed_probe_keeps_a_half_open_worker_out():
    pool, w, clock = _setup(failures=1, cooldown=5.0)
    pool.mark_failed(w, "x")
    clock.now += 5.0
    w.stub.fail = True
    await pool.probe_all()
    assert not w.healthy and not w.has_slot
    w.stub.fail = False
    await pool.probe_all()
    assert w.healthy and w.breaker.state is BreakerState.CLOSED and w.has_slot


# ------------------------------------------------------------------ end to end


async def test_breaker_holds_traffic_through_the_cooldown_then_recovers(cluster):
    w = await cluster.add_worker()
    for i in range(2):
        w.engine.on(f"boom{i}", fail_before_first=Unavailable("engine is not running"))
    sched = await cluster.start_scheduler(probe_interval=0.02, max_retries=0)
    handle = sched.svc.pool.workers[w.address]
    handle.breaker = CircuitBreaker(failures=2, cooldown=1.5)

    for i in range(2):
        await cluster.eventually(lambda: handle.has_slot, what="probe brought it back")
        err, _ = await cluster.rpc_error(sched.submit(f"boom{i}"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert handle.breaker.state is BreakerState.OPEN

    await cluster.eventually(lambda: handle.healthy, what="probes keep running while open")
    assert handle.breaker.state is BreakerState.OPEN and not handle.has_slot
    call = sched.submit("after")

    async def waiting() -> bool:
        return await sched.queued() == 1

    await cluster.eventually(waiting, what="request waits while the breaker is open")
    assert "after" not in w.engine.started  # held back by the open breaker
    resps = await asyncio.wait_for(cluster.collect(call), 10)
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert handle.breaker.state is BreakerState.CLOSED
    assert w.engine.started[-1] == "after"

"""Dispatch only into free worker slots, priority among waiters, admission,
deadlines and cancellation (queued and generating)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import ERROR_TRAILER, RETRY_AFTER_TRAILER, DeadlineExceeded
from llmfabric.structs import Sampling, ValidatedRequest

INTERACTIVE = common_pb2.PRIORITY_INTERACTIVE
BATCH = common_pb2.PRIORITY_BATCH
CRITICAL = common_pb2.PRIORITY_CRITICAL
BACKGROUND = common_pb2.PRIORITY_BACKGROUND


def _req(rid: str, priority: int = 0) -> ValidatedRequest:
    return ValidatedRequest(rid, "fake-model", (1, 2, 3), Sampling(0.0, 1.0, 0, 4), priority=priority)


async def test_second_request_waits_for_the_only_slot(cluster):
    w = await cluster.add_worker(capacity=1)
    gate = asyncio.Event()
    w.engine.on("A", hold=gate)
    sched = await cluster.start_scheduler()

    a = asyncio.ensure_future(sched.run("A"))
    await cluster.eventually(lambda: w.engine.started == ["A"], what="A started")
    b = asyncio.ensure_future(sched.run("B"))
    await cluster.eventually(sched.queued, what="B queued")

    status = await sched.status()
    assert status.queued == 1
    assert status.running == 1
    assert status.workers[0].in_flight == 1
    assert w.engine.started == ["A"]  # B never reached the engine while the slot was taken

    gate.set()
    ra, rb = await asyncio.gather(a, b)
    assert ra[-1].chunk.finish_reason == rb[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert w.engine.started == ["A", "B"]
    assert w.engine.max_active == 1
    status = await sched.status()
    assert (status.queued, status.running, status.workers[0].in_flight) == (0, 0, 0)


async def test_concurrency_never_exceeds_capacity(cluster):
    w = await cluster.add_worker(capacity=2)
    w.engine.default = cluster.Script(tokens=("x",) * 5, delay=0.005)
    sched = await cluster.start_scheduler()

    results = await asyncio.gather(*(sched.run(f"r{i}") for i in range(8)))

    assert all(r[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP for r in results)
    assert sorted(w.engine.completed) == sorted(f"r{i}" for i in range(8))
    assert w.engine.max_active == 2


async def test_capacity_is_summed_over_workers(cluster):
    a = await cluster.add_worker(capacity=1)
    b = await cluster.add_worker(capacity=2)
    gate = asyncio.Event()
    for w in (a, b):
        w.engine.default = cluster.Script(hold=gate)
    sched = await cluster.start_scheduler()

    calls = [asyncio.ensure_future(sched.run(f"r{i}")) for i in range(5)]
    await cluster.eventually(lambda: len(a.engine.started) + len(b.engine.started) == 3, what="3 running")
    await cluster.eventually(lambda: sched.queued(), what="2 queued")
    status = await sched.status()
    assert status.running == 3 and status.queued == 2
    assert (len(a.engine.started), len(b.engine.started)) == (1, 2)

    gate.set()
    await asyncio.gather(*calls)
    assert a.engine.max_active == 1 and b.engine.max_active == 2


async def test_interactive_overtakes_batch_that_arrived_first(cluster):
    w = await cluster.add_worker(capacity=1)
    gate = asyncio.Event()
    w.engine.on("first", hold=gate)
    sched = await cluster.start_scheduler()

    first = asyncio.ensure_future(sched.run("first"))
    await cluster.eventually(lambda: w.engine.started == ["first"])
    order = [
        ("batch-1", BATCH),
        ("background", BACKGROUND),
        ("batch-2", BATCH),
        ("interactive-1", INTERACTIVE),
        ("unspecified", 0),  # counts as INTERACTIVE, FIFO with it
        ("critical", CRITICAL),
        ("interactive-2", INTERACTIVE),
    ]
    calls = []
    for n, (rid, prio) in enumerate(order, start=1):
        calls.append(asyncio.ensure_future(sched.run(rid, priority=prio)))
        await cluster.eventually(lambda n=n: _queued_is(sched, n), what=f"{n} queued")

    gate.set()
    await asyncio.gather(first, *calls)

    assert w.engine.started == [
        "first",
        "critical",
        "interactive-1",
        "unspecified",
        "interactive-2",
        "batch-1",
        "batch-2",
        "background",
    ]


async def _queued_is(sched, n: int) -> bool:
    return await sched.queued() == n


async def test_full_queue_rejects_at_once_with_retry_hint(cluster):
    w = await cluster.add_worker(capacity=1)
    gate = asyncio.Event()
    w.engine.on("running", hold=gate)
    sched = await cluster.start_scheduler(max_waiting=1)

    running = asyncio.ensure_future(sched.run("running"))
    await cluster.eventually(lambda: w.engine.started == ["running"])
    waiting = asyncio.ensure_future(sched.run("waiting"))
    await cluster.eventually(lambda: _queued_is(sched, 1))

    err, got = await cluster.rpc_error(sched.submit("rejected"), timeout=5)

    assert got == []
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.details()
    assert int(cluster.trailer(err, RETRY_AFTER_TRAILER)) > 0
    assert isinstance(cluster.trailer(err, ERROR_TRAILER), bytes)
    info = cluster.error_info(err)
    assert info.code == "RESOURCE_EXHAUSTED"
    assert info.retry_after_ms > 0
    assert (await sched.status()).queued == 1  # the rejected one did not take a place

    gate.set()
    await asyncio.gather(running, waiting)
    assert w.engine.started == ["running", "waiting"]  # never "rejected"

    # room again once the queue drained
    await sched.run("after")
    assert w.engine.completed[-1] == "after"


async def test_deadline_passing_while_queued_never_reaches_the_engine(cluster):
    w = await cluster.add_worker(capacity=1)
    gate = asyncio.Event()
    w.engine.on("hog", hold=gate)
    sched = await cluster.start_scheduler()

    hog = asyncio.ensure_future(sched.run("hog"))
    await cluster.eventually(lambda: w.engine.started == ["hog"])

    err, got = await cluster.rpc_error(sched.submit("late", timeout=0.3), timeout=5)

    assert got == []
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await cluster.eventually(lambda: _queued_is(sched, 0), what="expired waiter removed")
    gate.set()
    await hog
    assert w.engine.started == ["hog"]
    status = await sched.status()
    assert (status.queued, status.running) == (0, 0)
    await sched.run("next")  # no slot leaked
    assert w.engine.started == ["hog", "next"]


async def test_dispatcher_raises_deadline_exceeded_while_waiting(cluster):
    w = await cluster.add_worker(capacity=1)
    gate = asyncio.Event()
    w.engine.on("hog", hold=gate)
    sched = await cluster.start_scheduler()
    d = sched.svc.dispatcher
    hog = asyncio.ensure_future(sched.run("hog"))
    await cluster.eventually(lambda: w.engine.started == ["hog"])

    agen = d.submit(_req("direct"), timeout=0.05)
    with pytest.raises(DeadlineExceeded, match="waiting for a worker"):
        await asyncio.wait_for(agen.__anext__(), 5)

    assert len(d.queue) == 0
    gate.set()
    await hog
    assert d.running == 0
    assert w.engine.started == ["hog"]


async def test_deadline_passing_while_generating_stops_the_engine(cluster):
    w = await cluster.add_worker(capacity=1)
    w.engine.on("slow", hold_after_first=asyncio.Event())  # never released
    sched = await cluster.start_scheduler()

    err, got = await cluster.rpc_error(sched.submit("slow", timeout=0.5), timeout=5)

    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [r.chunk.text for r in got] == ["Hel"]
    await cluster.eventually(lambda: w.engine.cancelled == ["slow"], what="engine generator closed")
    await cluster.eventually(lambda: _running_is(sched, 0), what="slot released")


async def _running_is(sched, n: int) -> bool:
    status = await sched.status()
    return status.running == n and sum(ws.in_flight for ws in status.workers) == n


async def test_cancel_while_queued_removes_the_request(cluster):
    w = await cluster.add_worker(capacity=1)
    gate = asyncio.Event()
    w.engine.on("hog", hold=gate)
    sched = await cluster.start_scheduler()

    hog = asyncio.ensure_future(sched.run("hog"))
    await cluster.eventually(lambda: w.engine.started == ["hog"])
    call = sched.submit("impatient")
    await cluster.eventually(lambda: _queued_is(sched, 1))

    call.cancel()
    await cluster.eventually(lambda: _queued_is(sched, 0), what="cancelled waiter removed")
    assert await call.code() == grpc.StatusCode.CANCELLED

    gate.set()
    await hog
    assert w.engine.started == ["hog"]  # the engine never saw it
    await sched.run("next")
    assert w.engine.started == ["hog", "next"]
    assert (await sched.status()).running == 0


async def test_cancel_while_generating_reaches_the_engine(cluster):
    w = await cluster.add_worker(capacity=1)
    w.engine.on("gen", hold_after_first=asyncio.Event())  # never released
    sched = await cluster.start_scheduler()

    call = sched.submit("gen")
    first = await asyncio.wait_for(call.read(), 5)
    assert first.chunk.text == "Hel"
    call.cancel()

    await cluster.eventually(lambda: w.engine.cancelled == ["gen"], what="engine generator closed")
    assert w.engine.active == 0
    await cluster.eventually(lambda: _running_is(sched, 0), what="slot released")
    # the slot is usable again
    resps = await sched.run("next")
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_cancel_before_first_token_reaches_the_engine(cluster):
    w = await cluster.add_worker(capacity=1)
    w.engine.on("gen", hold=asyncio.Event())  # never released
    sched = await cluster.start_scheduler()

    call = sched.submit("gen")
    await cluster.eventually(lambda: w.engine.started == ["gen"])
    call.cancel()

    await cluster.eventually(lambda: w.engine.cancelled == ["gen"], what="engine generator closed")
    await cluster.eventually(lambda: _running_is(sched, 0), what="slot released")


async def test_many_cancellations_leave_no_leaked_slots(cluster):
    w = await cluster.add_worker(capacity=2)
    w.engine.default = cluster.Script(hold_after_first=asyncio.Event())  # every request blocks after 1 token
    sched = await cluster.start_scheduler(max_waiting=64)

    calls = [sched.submit(f"c{i}") for i in range(10)]
    await cluster.eventually(lambda: len(w.engine.started) == 2)
    await cluster.eventually(lambda: _queued_is(sched, 8))
    for c in calls:
        c.cancel()
    await cluster.eventually(lambda: _queued_is(sched, 0), what="queue empty")
    await cluster.eventually(lambda: _running_is(sched, 0), what="no running")
    await cluster.eventually(lambda: w.engine.active == 0, what="engine idle")
    assert len(w.engine.started) == 2  # cancelled waiters never reached the engine
    w.engine.default = cluster.Script()
    resps = await sched.run("fresh")
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP

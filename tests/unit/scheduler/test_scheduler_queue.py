"""RequestQueue on its own (no gRPC), and the dispatcher's bookkeeping of it."""

from __future__ import annotations

import asyncio

import pytest

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import ResourceExhausted
from llmfabric.scheduler.queue import RequestQueue, Waiter
from llmfabric.structs import Sampling, ValidatedRequest

CRITICAL = common_pb2.PRIORITY_CRITICAL
INTERACTIVE = common_pb2.PRIORITY_INTERACTIVE
BATCH = common_pb2.PRIORITY_BATCH
BACKGROUND = common_pb2.PRIORITY_BACKGROUND


def _waiter(rid: str, priority: int = 0) -> Waiter:
    req = ValidatedRequest(rid, "m", (1,), Sampling(0.0, 1.0, 0, 1), priority=priority)
    return Waiter(req, asyncio.get_running_loop().create_future())


def _ids(waiters) -> list[str]:
    return [w.request.request_id for w in waiters]


async def test_empty_queue():
    q = RequestQueue(4)
    assert len(q) == 0
    assert q.peek() is None
    assert q.pop() is None
    assert q.drain() == []


async def test_fifo_within_a_priority_level():
    q = RequestQueue(10)
    for rid in ("a", "b", "c"):
        q.push(_waiter(rid, INTERACTIVE))
    assert len(q) == 3
    assert _ids([q.pop(), q.pop(), q.pop()]) == ["a", "b", "c"]
    assert len(q) == 0


async def test_strict_priority_then_arrival():
    q = RequestQueue(10)
    for rid, prio in [
        ("bg", BACKGROUND),
        ("b1", BATCH),
        ("i1", INTERACTIVE),
        ("u1", 0),  # UNSPECIFIED counts as INTERACTIVE
        ("c1", CRITICAL),
        ("b2", BATCH),
        ("i2", INTERACTIVE),
    ]:
        q.push(_waiter(rid, prio))
    assert _ids(q.drain()) == ["c1", "i1", "u1", "i2", "b1", "b2", "bg"]
    assert len(q) == 0


async def test_peek_does_not_remove():
    q = RequestQueue(10)
    q.push(_waiter("low", BATCH))
    q.push(_waiter("high", CRITICAL))
    assert q.peek().request.request_id == "high"
    assert q.peek().request.request_id == "high"
    assert len(q) == 2
    assert q.pop().request.request_id == "high"
    assert q.peek().request.request_id == "low"


async def test_remove_skips_the_waiter_and_frees_its_place():
    q = RequestQueue(3)
    a, b, c = _waiter("a"), _waiter("b"), _waiter("c")
    for w in (a, b, c):
        q.push(w)
    q.remove(b)
    assert len(q) == 2
    q.remove(b)  # idempotent
    assert len(q) == 2
    q.push(_waiter("d"))  # b's place is free again
    assert len(q) == 3
    assert _ids(q.drain()) == ["a", "c", "d"]
    assert len(q) == 0


async def test_remove_the_head():
    q = RequestQueue(3)
    a, b = _waiter("a"), _waiter("b")
    q.push(a)
    q.push(b)
    q.remove(a)
    assert q.peek() is b
    assert q.pop() is b
    assert q.pop() is None
    assert len(q) == 0


async def test_bound_rejects_with_resource_exhausted_and_retry_hint():
    q = RequestQueue(2)
    q.push(_waiter("a"))
    q.push(_waiter("b"))
    with pytest.raises(ResourceExhausted) as exc_info:
        q.push(_waiter("c"))
    assert exc_info.value.retry_after_ms > 0
    assert "full" in exc_info.value.message and "interactive" in exc_info.value.message
    assert len(q) == 2
    q.push(_waiter("crit", CRITICAL))  # the bound is per level: a critical request still gets in
    assert len(q) == 3
    assert q.pop().request.request_id == "crit"
    q.pop()
    q.push(_waiter("c"))  # room after a pop
    assert len(q) == 2


async def test_drain_returns_all_in_order_and_empties():
    q = RequestQueue(5)
    for rid, prio in [("b", BATCH), ("i", INTERACTIVE), ("c", CRITICAL)]:
        q.push(_waiter(rid, prio))
    assert _ids(q.drain()) == ["c", "i", "b"]
    assert len(q) == 0
    assert q.pop() is None
    q.push(_waiter("again"))
    assert len(q) == 1


async def test_remove_after_pop_leaves_the_size_alone():
    q = RequestQueue(2)
    w = _waiter("a")
    q.push(w)
    assert q.pop() is w
    q.remove(w)  # what Dispatcher._lease does when it gives up just as a slot was granted
    assert len(q) == 0


# ------------------------------------------------------------ dispatcher bookkeeping


def _req(rid: str) -> ValidatedRequest:
    return ValidatedRequest(rid, "fake-model", (1, 2, 3), Sampling(0.0, 1.0, 0, 4))


async def test_cancel_in_the_turn_a_slot_is_granted_keeps_the_queue_count(cluster):
    w = await cluster.add_worker(capacity=1)
    w.engine.default = cluster.Script(hold=asyncio.Event())  # never released
    sched = await cluster.start_scheduler(probe_interval=60)
    d = sched.svc.dispatcher

    task_a = asyncio.ensure_future(d.submit(_req("A")).__anext__())
    await cluster.eventually(lambda: w.engine.started == ["A"])
    task_b = asyncio.ensure_future(d.submit(_req("B")).__anext__())
    await cluster.eventually(lambda: len(d.queue) == 1)

    # In one loop turn: B's caller goes away, and a slot appears (as when another
    # request's stream ends) so the dispatcher hands it to B before B runs.
    task_b.cancel()
    d.pool.workers[w.address].capacity = 2
    d.pool.on_change()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task_b, 5)

    try:
        assert d.running == 1  # B's slot was given back
        assert len(d.queue) == 0
        status = await sched.status()  # INTERNAL while the count is negative
        assert status.queued == 0
    finally:
        task_a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task_a, 5)


async def test_admission_bound_counts_only_waiting_requests(cluster):
    """Requests holding a worker slot do not count against max_waiting."""
    w = await cluster.add_worker(capacity=2)
    gate = asyncio.Event()
    w.engine.default = cluster.Script(hold=gate)
    sched = await cluster.start_scheduler(max_waiting=1)

    running = [asyncio.ensure_future(sched.run(f"r{i}")) for i in range(2)]
    await cluster.eventually(lambda: len(w.engine.started) == 2)
    waiting = asyncio.ensure_future(sched.run("w"))
    await cluster.eventually(lambda: len(sched.svc.dispatcher.queue) == 1)
    err, _ = await cluster.rpc_error(sched.submit("x"), timeout=5)
    assert err.code().name == "RESOURCE_EXHAUSTED"
    gate.set()
    await asyncio.gather(*running, waiting)
    assert sorted(w.engine.completed) == ["r0", "r1", "w"]

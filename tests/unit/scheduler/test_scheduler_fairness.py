"""Queue order: strict priority with aging, weighted tenant fairness, per-level bounds, tenant priority caps."""

from __future__ import annotations

import asyncio
import collections

import pytest

from llmfabric.frontend.headers import priority_from_header
from llmfabric.runtime.errors import InvalidArgument, ResourceExhausted
from llmfabric.scheduler.dispatcher import Dispatcher
from llmfabric.scheduler.queue import QueuePolicy, RequestQueue, Waiter
from llmfabric.structs import Sampling, ValidatedRequest

CRITICAL, INTERACTIVE, BATCH, BACKGROUND = 1, 2, 3, 4


def waiter(rid: str, priority: int = INTERACTIVE, tenant: str = "", tokens: int = 4, at: float | None = None) -> Waiter:
    req = ValidatedRequest(rid, "m", tuple(range(tokens)), Sampling(0.0, 1.0, 0, 4), tenant_id=tenant, priority=priority)
    w = Waiter(req, asyncio.get_event_loop().create_future())
    if at is not None:
        w.enqueued_at = at
    return w


def order(q: RequestQueue) -> list[str]:
    return [w.request.request_id for w in q.drain()]


async def test_strict_priority_then_fifo():
    q = RequestQueue(policy=QueuePolicy(aging_rate=0))
    for rid, prio in [("b1", BATCH), ("i1", INTERACTIVE), ("g1", BACKGROUND), ("c1", CRITICAL), ("i2", INTERACTIVE)]:
        q.push(waiter(rid, prio))
    assert order(q) == ["c1", "i1", "i2", "b1", "g1"]


async def test_aging_promotes_a_long_waiting_request():
    q = RequestQueue(policy=QueuePolicy(aging_rate=0.1))
    import time

    now = time.monotonic()
    q.push(waiter("old-batch", BATCH, at=now - 11))  # waited 11 s: one level up -> competes as interactive
    q.push(waiter("new-interactive", INTERACTIVE, at=now))
    assert q.pop().request.request_id == "new-interactive"  # tie on effective level: the higher original level wins
    q.push(waiter("old-background", BACKGROUND, at=now - 25))  # two levels up -> interactive
    q.push(waiter("fresh-batch", BATCH, at=now))
    assert order(q) == ["old-batch", "old-background", "fresh-batch"]
    q.push(waiter("ancient-background", BACKGROUND, at=now - 40))  # four levels up: ahead of a fresh interactive
    q.push(waiter("i", INTERACTIVE, at=now))
    assert q.pop().request.request_id == "ancient-background"


async def test_aging_bounds_the_wait_of_a_flooded_low_level():
    """With a continuous interactive flood, a batch request is still served
    once it has aged past the flood's level."""
    import time

    q = RequestQueue(policy=QueuePolicy(aging_rate=1.0))
    now = time.monotonic()
    q.push(waiter("batch", BATCH, at=now - 2.5))  # two levels up: ahead of interactive
    for i in range(5):
        q.push(waiter(f"i{i}", INTERACTIVE, at=now))
    assert q.pop().request.request_id == "batch"


async def test_noisy_tenant_cannot_starve_a_quiet_one():
    q = RequestQueue(policy=QueuePolicy(aging_rate=0))
    for i in range(20):
        q.push(waiter(f"noisy{i}", tenant="noisy"))
    q.push(waiter("quiet0", tenant="quiet"))
    q.push(waiter("quiet1", tenant="quiet"))
    got = order(q)
    assert got.index("quiet0") <= 1 and got.index("quiet1") <= 3


async def test_weighted_shares_follow_the_weights():
    q = RequestQueue(policy=QueuePolicy(aging_rate=0, tenant_weights=(("gold", 3.0),)))
    for i in range(40):
        q.push(waiter(f"g{i}", tenant="gold"))
        q.push(waiter(f"s{i}", tenant="silver"))
    first = order(q)[:40]
    counts = collections.Counter(rid[0] for rid in first)
    assert counts["g"] == 30 and counts["s"] == 10


async def test_idle_tenant_does_not_bank_credit():
    q = RequestQueue(policy=QueuePolicy(aging_rate=0))
    for i in range(10):
        q.push(waiter(f"a{i}", tenant="a"))
    for _ in range(8):
        q.pop()
    for i in range(6):
        q.push(waiter(f"b{i}", tenant="b"))  # b was idle while a ran 8: it must not now run 8 in a row
    got = order(q)
    assert got[:4] in (["a8", "b0", "a9", "b1"], ["b0", "a8", "b1", "a9"])


async def test_bounds_are_per_level_by_requests_and_tokens():
    q = RequestQueue(policy=QueuePolicy(max_waiting=3, max_waiting_tokens=100))
    q.push(waiter("a", tokens=60))
    with pytest.raises(ResourceExhausted) as info:
        q.push(waiter("b", tokens=50))  # 110 tokens > 100 at this level
    assert "prompt tokens" in info.value.message and info.value.retry_after_ms > 0
    q.push(waiter("c", BATCH, tokens=50))  # another level has its own budget
    q.push(waiter("d", tokens=40))
    q.push(waiter("e", tokens=0))
    with pytest.raises(ResourceExhausted):
        q.push(waiter("f", tokens=0))  # 3 interactive requests already wait
    assert len(q) == 4
    big = RequestQueue(policy=QueuePolicy(max_waiting_tokens=10))
    big.push(waiter("huge", tokens=500))  # one oversized request alone is admitted (the tokenizer bounds sizes)


async def test_cancelled_and_removed_waiters_free_their_share():
    q = RequestQueue(policy=QueuePolicy(max_waiting=2))
    a, b = waiter("a"), waiter("b")
    q.push(a)
    q.push(b)
    q.remove(a)
    q.push(waiter("c"))
    assert order(q) == ["b", "c"]


async def test_tenant_priority_caps():
    d = Dispatcher.__new__(Dispatcher)
    d.priority_caps = {"free": BATCH, "*": INTERACTIVE}
    req = ValidatedRequest("r", "m", (1,), Sampling(0.0, 1.0, 0, 4), tenant_id="free", priority=CRITICAL)
    assert d._capped(req).priority == BATCH
    assert d._capped(ValidatedRequest("r", "m", (1,), Sampling(0.0, 1.0, 0, 4), tenant_id="x", priority=CRITICAL)).priority == INTERACTIVE
    low = ValidatedRequest("r", "m", (1,), Sampling(0.0, 1.0, 0, 4), tenant_id="free", priority=BACKGROUND)
    assert d._capped(low) is low  # lower than the cap: unchanged


@pytest.mark.parametrize(("value", "expected"), [("", 0), (None, 0), ("batch", 3), ("Interactive", 2), ("PRIORITY_CRITICAL", 1), ("4", 4)])
def test_priority_header(value, expected):
    assert priority_from_header(value) == expected


@pytest.mark.parametrize("value", ["urgent", "0", "9", "-1"])
def test_bad_priority_header_names_it(value):
    with pytest.raises(InvalidArgument) as info:
        priority_from_header(value)
    assert info.value.field == "x-priority"


class _Pool:
    """The slice of WorkerPool the dispatcher's slot logic uses."""

    def __init__(self, workers) -> None:
        self.workers = {w.address: w for w in workers}
        self.on_change = lambda: None

    def available(self):
        return [w for w in self.workers.values() if w.has_slot]

    def healthy(self):
        return [w for w in self.workers.values() if w.healthy]

    def add_listener(self, listener) -> None:  # pragma: no cover - routers may register
        pass


def _worker(address: str, capacity: int):
    from llmfabric.scheduler.pool import WorkerHandle

    return WorkerHandle(address=address, channel=None, stub=None, id=address, capacity=capacity, healthy=True)


async def test_batch_leaves_reserved_slots_for_interactive():
    from llmfabric.scheduler.router import create_router

    w = _worker("w:1", capacity=3)
    d = Dispatcher(_Pool([w]), RequestQueue(policy=QueuePolicy(aging_rate=0)), create_router("least_load"), reserved_slots=1)
    batch = [waiter(f"b{i}", BATCH) for i in range(3)]
    for b in batch:
        d.queue.push(b)
    d._dispatch()
    assert [b.future.done() for b in batch] == [True, True, False]  # the third slot stays free
    inter = waiter("i", INTERACTIVE)
    d.queue.push(inter)
    d._dispatch()
    assert inter.future.done() and inter.future.result() is w  # ... and an interactive request gets it at once
    assert w.in_flight == 3


async def test_no_reservation_when_disabled_or_capacity_one():
    from llmfabric.scheduler.router import create_router

    one = _worker("w:1", capacity=1)
    d = Dispatcher(_Pool([one]), RequestQueue(), create_router("least_load"), reserved_slots=1)
    b = waiter("b", BATCH)
    d.queue.push(b)
    d._dispatch()
    assert b.future.done()  # a 1-slot worker is never fully reserved
    three = _worker("w:2", capacity=3)
    d = Dispatcher(_Pool([three]), RequestQueue(), create_router("least_load"), reserved_slots=0)
    bs = [waiter(f"b{i}", BATCH) for i in range(3)]
    for x in bs:
        d.queue.push(x)
    d._dispatch()
    assert all(x.future.done() for x in bs)

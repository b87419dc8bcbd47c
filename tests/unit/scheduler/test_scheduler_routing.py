"""Routing policies on WorkerHandle objects, and end to end through Submit."""

from __future__ import annotations

import asyncio

import pytest

from llmfabric.scheduler.pool import WorkerHandle
from llmfabric.scheduler.router import LeastLoadRouter, RoundRobinRouter, RoutingPolicy, create_router
from llmfabric.structs import Sampling, ValidatedRequest

REQ = ValidatedRequest("r", "m", (1, 2), Sampling(0.0, 1.0, 0, 4))


def _handle(address: str, *, capacity: int = 4, in_flight: int = 0, healthy: bool = True) -> WorkerHandle:
    return WorkerHandle(address, channel=None, stub=None, id=address, capacity=capacity, in_flight=in_flight, healthy=healthy)


# ------------------------------------------------------------------ unit


def test_create_router_from_string_and_enum():
    assert isinstance(create_router("round_robin"), RoundRobinRouter)
    assert isinstance(create_router(RoutingPolicy.ROUND_ROBIN), RoundRobinRouter)
    assert isinstance(create_router("least_load"), LeastLoadRouter)
    assert isinstance(create_router(RoutingPolicy.LEAST_LOAD), LeastLoadRouter)


def test_create_router_rejects_unknown_policy():
    with pytest.raises(ValueError):
        create_router("random")


def test_round_robin_alternates():
    a, b = _handle("10.0.0.1:1"), _handle("10.0.0.2:1")
    r = RoundRobinRouter()
    picks = [r.pick([a, b], REQ) for _ in range(6)]
    assert picks == [a, b, a, b, a, b]


def test_round_robin_cycles_through_three_whatever_the_candidate_order():
    a, b, c = _handle("h:1"), _handle("h:2"), _handle("h:3")
    r = RoundRobinRouter()
    picks = [r.pick(order, REQ) for order in ([c, a, b], [b, c, a], [a, b, c], [c, b, a], [a, c, b], [b, a, c])]
    assert [p.address for p in picks] == ["h:1", "h:2", "h:3", "h:1", "h:2", "h:3"]


def test_round_robin_single_candidate():
    a = _handle("h:1")
    r = RoundRobinRouter()
    assert all(r.pick([a], REQ) is a for _ in range(3))


def test_round_robin_routers_are_independent():
    a, b = _handle("h:1"), _handle("h:2")
    r1, r2 = RoundRobinRouter(), RoundRobinRouter()
    assert r1.pick([a, b], REQ) is a
    assert r2.pick([a, b], REQ) is a


def test_least_load_picks_the_least_loaded():
    a = _handle("h:1", in_flight=3)
    b = _handle("h:2", in_flight=1)
    c = _handle("h:3", in_flight=2)
    assert LeastLoadRouter().pick([a, b, c], REQ) is b


def test_least_load_compares_load_relative_to_capacity():
    big = _handle("h:1", capacity=8, in_flight=3)  # 37% busy
    small = _handle("h:2", capacity=2, in_flight=1)  # 50% busy
    assert LeastLoadRouter().pick([small, big], REQ) is big


def test_least_load_ties_break_on_in_flight_then_address():
    a = _handle("h:2", capacity=4, in_flight=2)  # 50%
    b = _handle("h:1", capacity=2, in_flight=1)  # 50%, fewer in flight
    assert LeastLoadRouter().pick([a, b], REQ) is b
    x, y = _handle("h:9"), _handle("h:3")
    assert LeastLoadRouter().pick([x, y], REQ) is y


def test_least_load_spreads_as_in_flight_grows():
    a, b = _handle("h:1", capacity=2), _handle("h:2", capacity=2)
    r = LeastLoadRouter()
    picks = []
    for _ in range(4):
        w = r.pick([h for h in (a, b) if h.has_slot], REQ)
        w.in_flight += 1
        picks.append(w.address)
    assert sorted(picks) == ["h:1", "h:1", "h:2", "h:2"]
    assert not a.has_slot and not b.has_slot


def test_worker_handle_has_slot():
    assert _handle("h:1", capacity=2, in_flight=1).has_slot
    assert not _handle("h:1", capacity=2, in_flight=2).has_slot
    assert not _handle("h:1", capacity=2, in_flight=0, healthy=False).has_slot


# ------------------------------------------------------------------ end to end


async def test_round_robin_alternates_between_workers(cluster):
    a = await cluster.add_worker(capacity=4)
    b = await cluster.add_worker(capacity=4)
    sched = await cluster.start_scheduler(routing="round_robin", probe_interval=60)

    used = [(await sched.run(f"r{i}"))[0].worker_id for i in range(6)]

    first, second = sorted([a, b], key=lambda w: w.address)
    assert used == [first.worker_id, second.worker_id] * 3
    assert len(a.engine.completed) == len(b.engine.completed) == 3


async def test_least_load_sends_new_work_to_the_idle_worker(cluster):
    a = await cluster.add_worker(capacity=4)
    b = await cluster.add_worker(capacity=4)
    gate = asyncio.Event()
    for w in (a, b):
        w.engine.default = cluster.Script(hold=gate)
    sched = await cluster.start_scheduler(routing="least_load", probe_interval=60)

    calls = []
    for i in range(6):
        calls.append(asyncio.ensure_future(sched.run(f"r{i}")))
        await cluster.eventually(lambda i=i: len(a.engine.started) + len(b.engine.started) == i + 1)
        # after every dispatch the two workers differ by at most one request
        assert abs(len(a.engine.started) - len(b.engine.started)) <= 1
    assert len(a.engine.started) == len(b.engine.started) == 3
    gate.set()
    await asyncio.gather(*calls)


async def test_least_load_prefers_the_worker_with_spare_capacity(cluster):
    small = await cluster.add_worker(capacity=1)
    big = await cluster.add_worker(capacity=4)
    gate = asyncio.Event()
    for w in (small, big):
        w.engine.default = cluster.Script(hold=gate)
    sched = await cluster.start_scheduler(routing="least_load", probe_interval=60)

    calls = [asyncio.ensure_future(sched.run(f"r{i}")) for i in range(5)]
    await cluster.eventually(lambda: len(small.engine.started) + len(big.engine.started) == 5)
    assert (len(small.engine.started), len(big.engine.started)) == (1, 4)
    gate.set()
    await asyncio.gather(*calls)


async def test_unhealthy_worker_gets_no_traffic(cluster):
    from llmfabric.runtime.errors import Unavailable

    a = await cluster.add_worker(capacity=4)
    b = await cluster.add_worker(capacity=4)
    a.engine.load_error = Unavailable("down")
    sched = await cluster.start_scheduler(routing="round_robin", probe_interval=60)

    for i in range(4):
        resps = await sched.run(f"r{i}")
        assert resps[0].worker_id == b.worker_id
    assert a.engine.started == []

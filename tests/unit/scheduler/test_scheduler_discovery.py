"""Workers joining and leaving discovery while the scheduler runs."""

from __future__ import annotations

import asyncio

from llmfabric.common.v1 import common_pb2
from llmfabric.scheduler.discovery import Endpoint


class ChangingDiscovery:
    """A Discovery whose set the test changes."""

    def __init__(self, addresses: list[str]) -> None:
        self._endpoints = [Endpoint(a) for a in addresses]
        self._callbacks = []

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    def subscribe(self, callback) -> None:
        self._callbacks.append(callback)

    def set(self, addresses: list[str]) -> None:
        self._endpoints = [Endpoint(a) for a in addresses]
        for cb in self._callbacks:
            cb(self.endpoints())


async def _addresses(sched) -> set[str]:
    return {ws.address for ws in (await sched.status()).workers}


async def _healthy_count(sched) -> int:
    return sum(ws.healthy for ws in (await sched.status()).workers)


async def test_a_new_worker_gets_traffic_after_its_first_probe(cluster):
    a = await cluster.add_worker(capacity=1)
    b = await cluster.add_worker(capacity=1)
    disc = ChangingDiscovery([a.address])
    sched = await cluster.start_scheduler([a], discovery=disc, probe_interval=0.05)
    assert await _addresses(sched) == {a.address}

    disc.set([a.address, b.address])
    assert await _addresses(sched) == {a.address, b.address}  # listed at once, healthy after a probe
    await cluster.eventually(lambda: _healthy_count_is(sched, 2), what="new worker probed healthy")

    gate = asyncio.Event()
    a.engine.default = cluster.Script(hold=gate)
    b.engine.default = cluster.Script(hold=gate)
    calls = [asyncio.ensure_future(sched.run(f"r{i}")) for i in range(2)]
    await cluster.eventually(lambda: len(a.engine.started) == 1 and len(b.engine.started) == 1)
    gate.set()
    await asyncio.gather(*calls)


async def _healthy_count_is(sched, n: int) -> bool:
    return await _healthy_count(sched) == n


async def test_a_removed_worker_gets_no_new_traffic_and_in_flight_work_finishes(cluster):
    a = await cluster.add_worker(capacity=2)
    b = await cluster.add_worker(capacity=2)
    disc = ChangingDiscovery([a.address, b.address])
    sched = await cluster.start_scheduler([a, b], discovery=disc, probe_interval=60)
    leaving, staying = sorted([a, b], key=lambda w: w.address)  # the router's first pick leaves

    gate = asyncio.Event()
    leaving.engine.on("in-flight", hold=gate)
    call = asyncio.ensure_future(sched.run("in-flight"))
    await cluster.eventually(lambda: leaving.engine.started == ["in-flight"])

    disc.set([staying.address])
    assert await _addresses(sched) == {staying.address}
    for i in range(3):
        resps = await sched.run(f"new{i}")
        assert resps[0].worker_id == staying.worker_id
    assert leaving.engine.started == ["in-flight"]

    gate.set()
    resps = await call  # the channel closes with a grace period: the stream completes
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (await sched.status()).running == 0


async def test_all_workers_leaving_fails_waiting_requests_fast(cluster):
    a = await cluster.add_worker(capacity=1)
    disc = ChangingDiscovery([a.address])
    sched = await cluster.start_scheduler([a], discovery=disc, probe_interval=60)
    gate = asyncio.Event()
    a.engine.on("running", hold=gate)
    running = asyncio.ensure_future(sched.run("running"))
    await cluster.eventually(lambda: a.engine.started == ["running"])
    waiting = sched.submit("waiting")
    await cluster.eventually(lambda: len(sched.svc.dispatcher.queue) == 1)

    disc.set([])

    err, _ = await cluster.rpc_error(waiting, timeout=5)
    assert err.code().name == "UNAVAILABLE"
    gate.set()
    await running

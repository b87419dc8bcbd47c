"""Worker failures: retry before the first token, a clean error after it,
fast UNAVAILABLE when nothing is healthy, and recovery through probes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import Unavailable


def _first_and_other(workers):
    """The worker the router picks first when all are idle (lowest address
    for both policies), and the other one."""
    first = min(workers, key=lambda w: w.address)
    (other,) = [w for w in workers if w is not first]
    return first, other


async def _healthy(sched, address: str) -> bool:
    status = await sched.status()
    return any(ws.address == address and ws.healthy for ws in status.workers)


async def _unhealthy(sched, address: str) -> bool:
    status = await sched.status()
    return any(ws.address == address and not ws.healthy for ws in status.workers)


async def test_failure_before_first_token_is_retried_on_the_other_worker(cluster):
    workers = [await cluster.add_worker(), await cluster.add_worker()]
    bad, good = _first_and_other(workers)
    bad.engine.on("r", fail_before_first=Unavailable("engine is not running"))
    good.engine.default = cluster.Script(tokens=("all", " of", " it"))
    sched = await cluster.start_scheduler(probe_interval=60)

    resps = await sched.run("r")

    assert "".join(r.chunk.text for r in resps) == "all of it"
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert resps[0].worker_id == good.worker_id and resps[-1].worker_id == good.worker_id
    assert bad.engine.failed == ["r"]
    assert good.engine.completed == ["r"]
    status = await sched.status()
    assert status.running == 0 and all(ws.in_flight == 0 for ws in status.workers)
    assert await _unhealthy(sched, bad.address)  # UNAVAILABLE took it out of rotation


async def test_worker_killed_before_first_token_is_retried_on_the_other_worker(cluster):
    workers = [await cluster.add_worker(), await cluster.add_worker()]
    doomed, good = _first_and_other(workers)
    doomed.engine.on("r", hold=asyncio.Event())  # never produces a token
    sched = await cluster.start_scheduler(probe_interval=60)

    task = asyncio.ensure_future(sched.run("r"))
    await cluster.eventually(lambda: doomed.engine.started == ["r"])
    await doomed.kill()
    resps = await task

    assert "".join(r.chunk.text for r in resps) == "Hello, world"
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert good.engine.completed == ["r"]
    assert await _unhealthy(sched, doomed.address)


async def test_no_retry_when_max_retries_is_zero(cluster):
    workers = [await cluster.add_worker(), await cluster.add_worker()]
    bad, good = _first_and_other(workers)
    bad.engine.on("r", fail_before_first=Unavailable("engine is not running"))
    sched = await cluster.start_scheduler(probe_interval=60, max_retries=0)

    err, got = await cluster.rpc_error(sched.submit("r"))

    assert got == []
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "before the first token" in err.details()
    assert good.engine.started == []


async def test_retries_are_bounded(cluster):
    workers = [await cluster.add_worker() for _ in range(3)]
    for w in workers:
        w.engine.on("r", fail_before_first=Unavailable("engine is not running"))
    sched = await cluster.start_scheduler(probe_interval=60, max_retries=1)

    err, _ = await cluster.rpc_error(sched.submit("r"))

    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert sum(len(w.engine.started) for w in workers) == 2  # first try + one retry
    assert (await sched.status()).running == 0


async def test_failure_after_first_token_ends_with_a_clear_unavailable(cluster):
    workers = [await cluster.add_worker(), await cluster.add_worker()]
    bad, good = _first_and_other(workers)
    bad.engine.on("r", fail_after_first=Unavailable("engine failure: decode returned -1"))
    sched = await cluster.start_scheduler(probe_interval=60)

    err, got = await cluster.rpc_error(sched.submit("r"))

    assert [r.chunk.text for r in got] == ["Hel"]
    assert got[0].worker_id == bad.worker_id
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "mid-stream" in err.details()
    assert bad.worker_id in err.details()
    assert cluster.error_info(err).code == "UNAVAILABLE"
    assert good.engine.started == []  # a started answer is never replayed elsewhere
    assert (await sched.status()).running == 0


async def test_worker_killed_mid_stream_ends_with_a_clear_unavailable(cluster):
    workers = [await cluster.add_worker(), await cluster.add_worker()]
    doomed, good = _first_and_other(workers)
    doomed.engine.on("r", hold_after_first=asyncio.Event())
    sched = await cluster.start_scheduler(probe_interval=60)

    call = sched.submit("r")
    first = await asyncio.wait_for(call.read(), 5)
    assert first.chunk.text == "Hel"
    await doomed.kill()
    err, rest = await cluster.rpc_error(call)

    assert rest == []
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "mid-stream" in err.details() and doomed.worker_id in err.details()
    assert good.engine.started == []
    await cluster.eventually(lambda: _unhealthy(sched, doomed.address))
    # the surviving worker keeps serving
    resps = await sched.run("after")
    assert resps[-1].worker_id == good.worker_id


async def test_all_workers_down_is_unavailable_fast(cluster):
    workers = [await cluster.add_worker(), await cluster.add_worker()]
    addresses = [w.address for w in workers]
    for w in workers:
        await w.kill()
    sched = await cluster.start_scheduler(addresses)

    err, got = await cluster.rpc_error(sched.submit("r"), timeout=5)  # bounded: a hang fails here

    assert got == []
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy worker" in err.details()
    assert (await sched.status()).queued == 0


async def test_unreachable_address_is_unavailable_fast(cluster):
    sched = await cluster.start_scheduler(["127.0.0.1:1"])
    err, _ = await cluster.rpc_error(sched.submit("r"), timeout=5)
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_waiting_requests_fail_fast_when_the_last_worker_dies(cluster):
    w = await cluster.add_worker(capacity=1)
    w.engine.on("running", hold=asyncio.Event())
    sched = await cluster.start_scheduler(probe_interval=60)

    running = sched.submit("running")
    await cluster.eventually(lambda: w.engine.started == ["running"])
    waiting = [sched.submit(f"w{i}") for i in range(3)]
    await cluster.eventually(lambda: sched.svc.dispatcher.queue.__len__() == 3)

    await w.kill()

    for call in (running, *waiting):
        err, _ = await cluster.rpc_error(call, timeout=5)  # bounded: no hang
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    status = await sched.status()
    assert (status.queued, status.running) == (0, 0)


async def test_probe_failure_takes_a_worker_out_and_success_brings_it_back(cluster):
    w = await cluster.add_worker()
    sched = await cluster.start_scheduler(probe_interval=0.05)
    assert await _healthy(sched, w.address)

    w.engine.load_error = Unavailable("engine overloaded")  # GetLoad fails
    await cluster.eventually(lambda: _unhealthy(sched, w.address), what="marked unhealthy")
    err, _ = await cluster.rpc_error(sched.submit("while-down"), timeout=5)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert w.engine.started == []

    w.engine.load_error = None
    await cluster.eventually(lambda: _healthy(sched, w.address), what="healthy again")
    resps = await sched.run("after")
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_worker_failing_a_call_returns_after_its_probe_succeeds(cluster):
    w = await cluster.add_worker()
    w.engine.on("boom", fail_before_first=Unavailable("engine is not running"))
    sched = await cluster.start_scheduler(probe_interval=0.05, max_retries=0)

    err, _ = await cluster.rpc_error(sched.submit("boom"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    await cluster.eventually(lambda: _healthy(sched, w.address), what="probe brought it back")
    resps = await sched.run("after")
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert w.engine.completed == ["after"]


async def test_restarted_worker_rejoins_after_a_probe(cluster):
    w = await cluster.add_worker()
    sched = await cluster.start_scheduler(probe_interval=0.05)
    await w.kill()
    await cluster.eventually(lambda: _unhealthy(sched, w.address), what="dead worker noticed")
    err, _ = await cluster.rpc_error(sched.submit("down"), timeout=5)
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    again = await cluster.restart(w)
    await cluster.eventually(lambda: _healthy(sched, again.address), timeout=15, what="rejoined")
    resps = await sched.run("up")
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert again.engine.completed == ["up"]


async def test_internal_error_before_first_token_is_retried_on_the_other_worker(cluster):
    workers = [await cluster.add_worker(), await cluster.add_worker()]
    bad, good = _first_and_other(workers)
    bad.engine.on("r", fail_before_first=RuntimeError("CUDA error: illegal memory access"))
    sched = await cluster.start_scheduler(probe_interval=60)

    resps = await sched.run("r")

    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert good.engine.completed == ["r"]
    assert bad.engine.started == ["r"]

"""Submit relays a worker's stream: order, final chunk, request fields,
worker ids, status, and errors relayed from the worker with their details."""

from __future__ import annotations

import grpc

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import RETRY_AFTER_TRAILER, ResourceExhausted
from llmfabric.scheduler.v1 import scheduler_pb2


async def test_stream_is_relayed_in_order_with_final_finish_and_usage(cluster):
    w = await cluster.add_worker(capacity=2)
    w.engine.default = cluster.Script(tokens=("a", "b", "c", "d", "e"))
    sched = await cluster.start_scheduler()

    resps = await sched.run("r1", prompt=(5, 6, 7, 8))

    assert [r.chunk.text for r in resps] == ["a", "b", "c", "d", "e"]
    assert [list(r.chunk.token_ids) for r in resps] == [[100], [101], [102], [103], [104]]
    *middle, last = resps
    assert all(r.chunk.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in middle)
    assert all(not r.chunk.HasField("usage") for r in middle)
    assert last.chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert last.chunk.usage.prompt_tokens == 4
    assert last.chunk.usage.completion_tokens == 5
    assert last.chunk.usage.total_tokens == 9
    # the worker id is on the first and the last chunk only
    assert resps[0].worker_id == w.worker_id
    assert last.worker_id == w.worker_id
    assert all(r.worker_id == "" for r in resps[1:-1])
    assert w.engine.completed == ["r1"]


async def test_single_chunk_answer_carries_worker_id(cluster):
    w = await cluster.add_worker()
    w.engine.default = cluster.Script(tokens=("only",))
    sched = await cluster.start_scheduler()
    (resp,) = await sched.run("one")
    assert resp.chunk.text == "only"
    assert resp.chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert resp.worker_id == w.worker_id


async def test_request_fields_reach_the_engine_unchanged(cluster):
    w = await cluster.add_worker()
    sched = await cluster.start_scheduler()

    await sched.run(
        "fields",
        prompt=(9, 8, 7),
        priority=common_pb2.PRIORITY_BATCH,
        max_tokens=12,
        tenant="acme",
        cache_salt="s1",
        stop=("\n\n", "END"),
        seed=42,
    )

    req = w.engine.requests["fields"]
    assert req.request_id == "fields"
    assert req.prompt_token_ids == (9, 8, 7)
    assert req.priority == common_pb2.PRIORITY_BATCH
    assert req.tenant_id == "acme" and req.cache_salt == "s1"
    assert req.sampling.max_tokens == 12
    assert req.sampling.stop == ("\n\n", "END")
    assert req.sampling.seed == 42
    assert req.sampling.temperature == 0.0


async def test_empty_prompt_is_invalid_argument_naming_the_field(cluster):
    w = await cluster.add_worker()
    sched = await cluster.start_scheduler()

    err, got = await cluster.rpc_error(sched.submit("empty", prompt=()))

    assert got == []
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request.prompt_token_ids" in err.details()
    assert cluster.error_info(err).field == "request.prompt_token_ids"
    assert w.engine.started == []


async def test_worker_validation_error_is_relayed_with_its_field_and_not_retried(cluster):
    a = await cluster.add_worker(context_length=64)
    b = await cluster.add_worker(context_length=64)
    sched = await cluster.start_scheduler()

    err, _ = await cluster.rpc_error(sched.submit("too-long", prompt=tuple(range(1, 11)), max_tokens=60))

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.error_info(err).field == "request.sampling.max_tokens"
    assert "context" in err.details()
    assert a.engine.started == [] and b.engine.started == []
    status = await sched.status()
    assert all(ws.healthy for ws in status.workers)  # bad input does not make a worker unhealthy
    assert status.running == 0


async def test_worker_overload_is_relayed_as_resource_exhausted_with_retry_hint(cluster):
    w = await cluster.add_worker()
    w.engine.on("busy", fail_before_first=ResourceExhausted("worker queue is full", retry_after_ms=500))
    sched = await cluster.start_scheduler()

    err, got = await cluster.rpc_error(sched.submit("busy"))

    assert got == []
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert cluster.error_info(err).retry_after_ms == 500
    assert cluster.trailer(err, RETRY_AFTER_TRAILER) == "500"
    assert w.engine.started == ["busy"]  # not retried
    assert (await sched.status()).running == 0


async def test_get_status_reports_each_worker(cluster):
    a = await cluster.add_worker(capacity=3)
    b = await cluster.add_worker(capacity=1)
    sched = await cluster.start_scheduler()

    status = await sched.status()

    assert status.queued == 0 and status.running == 0
    by_addr = {ws.address: ws for ws in status.workers}
    assert set(by_addr) == {a.address, b.address}
    assert by_addr[a.address].id == a.worker_id
    assert by_addr[a.address].capacity == 3
    assert by_addr[b.address].capacity == 1
    assert all(ws.healthy and ws.in_flight == 0 for ws in status.workers)


async def test_request_id_metadata_is_propagated_to_the_worker(cluster):
    w = await cluster.add_worker()
    seen: list[str] = []
    orig = w.engine.generate

    async def spy(request):
        from llmfabric.runtime.context import current_request_id

        seen.append(current_request_id())
        async for c in orig(request):
            yield c

    w.engine.generate = spy
    sched = await cluster.start_scheduler()
    call = sched.submit("rid-prop", metadata=(("x-request-id", "trace-123"),))
    await cluster.collect(call)
    assert seen == ["trace-123"]


async def test_get_status_is_callable_without_workers_serving(cluster):
    sched = await cluster.start_scheduler(["127.0.0.1:1"])
    status = await sched.status()
    assert isinstance(status, scheduler_pb2.GetStatusResponse)
    assert [ws.healthy for ws in status.workers] == [False]

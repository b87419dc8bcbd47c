"""WorkerService through a real gRPC channel, with a fake engine."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime import health
from llmfabric.runtime.config import ConfigError, load_config
from llmfabric.runtime.errors import RETRY_AFTER_TRAILER, ResourceExhausted, Unavailable, info_from_trailers
from llmfabric.worker.config import PREFIX, WorkerConfig
from llmfabric.worker.v1 import worker_pb2


def _trailer(err: grpc.aio.AioRpcError, key: str):
    return dict(err.trailing_metadata() or ()).get(key)


async def _error(call, timeout: float = 5.0) -> tuple[grpc.aio.AioRpcError, list]:
    got = []

    async def read():
        while (resp := await call.read()) is not grpc.aio.EOF:
            got.append(resp)

    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await asyncio.wait_for(read(), timeout)
    return exc_info.value, got


# ------------------------------------------------------------------ info / load / flush


async def test_get_info(serve, fake_engine):
    w = await serve(fake_engine, worker_id="w-7")
    info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
    assert info.worker_id == "w-7"
    assert info.model == "fake-model"
    assert info.engine == "embedded"
    assert info.context_length == 128
    assert info.capacity == 3


async def test_default_worker_id_names_the_port(serve, fake_engine):
    w = await serve(fake_engine)
    info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
    assert info.worker_id == f"worker-{w.port}"


async def test_get_load_mirrors_the_engine(serve, fake_engine):
    w = await serve(fake_engine)
    ld = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
    assert (ld.running, ld.waiting, ld.capacity) == (1, 2, 3)
    assert (ld.kv_used, ld.kv_free) == (300, 9000)
    assert (ld.prompt_tokens_total, ld.cached_tokens_total, ld.evictions_total) == (1234, 567, 8)


async def test_get_load_error_is_mapped(serve, fake_engine):
    def broken():
        raise Unavailable("engine is not running")

    fake_engine.load = broken
    w = await serve(fake_engine)
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_flush_cache_reports_tokens_flushed(serve, fake_engine):
    w = await serve(fake_engine)
    resp = await w.stub.FlushCache(worker_pb2.FlushCacheRequest(), timeout=5)
    assert resp.tokens_flushed == 17


async def test_health_is_not_serving_until_loaded(serve, fake_engine):
    w = await serve(fake_engine, serving=False)
    assert await health.check(w.address) == "NOT_SERVING"
    assert await health.check(w.address, "llmfabric.worker.v1.WorkerService") == "NOT_SERVING"
    await w.svc.load()
    assert fake_engine.started
    await w.svc.host.set_serving(True)
    assert await health.check(w.address) == "SERVING"
    assert await health.check(w.address, "llmfabric.worker.v1.WorkerService") == "SERVING"


async def test_close_stops_the_engine(serve, fake_engine):
    w = await serve(fake_engine, close_engine=False)
    await w.svc.close()
    assert fake_engine.stopped


# ------------------------------------------------------------------ Generate


async def test_generate_streams_every_chunk(serve, fake_engine, make_tokenized):
    w = await serve(fake_engine)
    resps = [r async for r in w.generate(make_tokenized("g1", prompt=(5, 6), max_tokens=3), timeout=5)]

    assert [r.chunk.text for r in resps] == ["one", " two", " three"]
    assert [list(r.chunk.token_ids) for r in resps] == [[10], [11], [12]]
    assert [r.chunk.finish_reason for r in resps] == [
        common_pb2.FINISH_REASON_UNSPECIFIED,
        common_pb2.FINISH_REASON_UNSPECIFIED,
        common_pb2.FINISH_REASON_LENGTH,
    ]
    usage = resps[-1].chunk.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_tokens) == (2, 3, 5, 1)
    assert fake_engine.completed == ["g1"]


async def test_generate_converts_the_request(serve, fake_engine, make_tokenized):
    w = await serve(fake_engine)
    pb = make_tokenized("conv", prompt=(9, 9, 9), max_tokens=5, stop=["\n"], seed=3, repetition_penalty=1.1)
    pb.sampling.temperature = 0.5
    pb.tenant.id = "t1"
    pb.tenant.cache_salt = "salt"
    pb.priority = common_pb2.PRIORITY_BATCH
    [r async for r in w.generate(pb, timeout=5)]

    (req,) = fake_engine.requests
    assert req.request_id == "conv"
    assert req.prompt_token_ids == (9, 9, 9)
    assert req.sampling.max_tokens == 5
    assert req.sampling.stop == ("\n",)
    assert req.sampling.seed == 3
    assert req.sampling.temperature == pytest.approx(0.5)
    assert req.sampling.repetition_penalty == pytest.approx(1.1)
    assert (req.tenant_id, req.cache_salt, req.priority) == ("t1", "salt", common_pb2.PRIORITY_BATCH)


async def test_missing_seed_and_penalty_resolve_to_none_and_one(serve, fake_engine, make_tokenized):
    w = await serve(fake_engine)
    pb = make_tokenized("defaults")
    pb.sampling.ClearField("repetition_penalty")
    [r async for r in w.generate(pb, timeout=5)]
    (req,) = fake_engine.requests
    assert req.sampling.seed is None
    assert req.sampling.repetition_penalty == 1.0


async def test_empty_prompt_is_invalid_argument(serve, fake_engine, make_tokenized):
    w = await serve(fake_engine)
    err, got = await _error(w.generate(make_tokenized(prompt=())))
    assert got == []
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request.prompt_token_ids" in err.details()
    info = info_from_trailers(err.trailing_metadata())
    assert info.field == "request.prompt_token_ids"
    assert info.code == "INVALID_ARGUMENT"
    assert fake_engine.requests == []


@pytest.mark.parametrize("max_tokens", [0, -3])
async def test_max_tokens_below_one_is_invalid_argument(serve, fake_engine, make_tokenized, max_tokens):
    w = await serve(fake_engine)
    err, _ = await _error(w.generate(make_tokenized(max_tokens=max_tokens)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info_from_trailers(err.trailing_metadata()).field == "request.sampling.max_tokens"
    assert fake_engine.requests == []


async def test_prompt_plus_max_tokens_over_the_context_is_invalid_argument(serve, fake_engine, make_tokenized):
    w = await serve(fake_engine)  # context_length 128
    err, _ = await _error(w.generate(make_tokenized(prompt=tuple(range(1, 101)), max_tokens=29)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request.sampling.max_tokens" in err.details()
    assert "128" in err.details()
    assert info_from_trailers(err.trailing_metadata()).field == "request.sampling.max_tokens"
    assert fake_engine.requests == []


async def test_prompt_plus_max_tokens_exactly_the_context_is_accepted(serve, fake_engine, make_tokenized):
    w = await serve(fake_engine)
    resps = [r async for r in w.generate(make_tokenized(prompt=tuple(range(1, 101)), max_tokens=28), timeout=5)]
    assert resps[-1].chunk.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_engine_unavailable_maps_to_unavailable(serve, fake_engine, make_tokenized):
    fake_engine.fail = Unavailable("engine is not running")
    w = await serve(fake_engine)
    err, _ = await _error(w.generate(make_tokenized()))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "engine is not running" in err.details()


async def test_engine_overload_maps_to_resource_exhausted_with_retry_hint(serve, fake_engine, make_tokenized):
    fake_engine.fail = ResourceExhausted("worker queue is full (64 waiting)", retry_after_ms=500)
    w = await serve(fake_engine)
    err, _ = await _error(w.generate(make_tokenized()))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _trailer(err, RETRY_AFTER_TRAILER) == "500"
    assert info_from_trailers(err.trailing_metadata()).retry_after_ms == 500


async def test_unexpected_engine_error_is_internal_without_internals(serve, fake_engine, make_tokenized):
    fake_engine.fail = RuntimeError("secret /path/to/weights")
    w = await serve(fake_engine)
    err, _ = await _error(w.generate(make_tokenized()))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.details()
    assert "Generate" in err.details()


async def test_cancel_closes_the_engine_generator(serve, fake_engine, make_tokenized, wait_until):
    fake_engine.hold_after_first = asyncio.Event()  # never released
    w = await serve(fake_engine)
    call = w.generate(make_tokenized("c1"))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.chunk.text == "one"
    call.cancel()
    await wait_until(lambda: fake_engine.cancelled == ["c1"], what="engine generator closed")
    assert fake_engine.completed == []


async def test_deadline_closes_the_engine_generator(serve, fake_engine, make_tokenized, wait_until):
    fake_engine.hold_after_first = asyncio.Event()  # never released
    w = await serve(fake_engine)
    err, got = await _error(w.generate(make_tokenized("d1"), timeout=0.3))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [r.chunk.text for r in got] == ["one"]
    await wait_until(lambda: fake_engine.cancelled == ["d1"], what="engine generator closed")


async def test_many_concurrent_streams(serve, fake_engine, make_tokenized):
    w = await serve(fake_engine)

    async def one(i):
        return [r.chunk.text async for r in w.generate(make_tokenized(f"m{i}"), timeout=10)]

    outs = await asyncio.gather(*(one(i) for i in range(20)))
    assert all(o == ["one", " two", " three"] for o in outs)
    assert sorted(fake_engine.completed) == sorted(f"m{i}" for i in range(20))


# ------------------------------------------------------------------ config


def test_worker_config_defaults_and_env():
    cfg = load_config(WorkerConfig, PREFIX, [], environ={"LLMFABRIC_WORKER_CAPACITY": "2"})
    assert cfg.capacity == 2 and cfg.engine == "embedded"


@pytest.mark.parametrize(
    ("name", "value"),
    [("ENGINE", "vllm"), ("CAPACITY", "0"), ("CONTEXT_LENGTH", "8"), ("N_BATCH", "16"), ("MAX_WAITING", "-1")],
)
def test_worker_config_rejects_bad_values_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=f"LLMFABRIC_WORKER_{name}"):
        load_config(WorkerConfig, PREFIX, [], environ={f"LLMFABRIC_WORKER_{name}": value})


# ------------------------------------------------------------------ metrics


def _sample(w, name: str, **labels) -> float:
    return w.svc.host.registry.get_sample_value(name, labels) or 0.0


async def test_metrics_count_outcomes_and_tokens(serve, fake_engine, make_tokenized, wait_until):
    w = await serve(fake_engine)
    [r async for r in w.generate(make_tokenized("ok", prompt=(1, 2, 3, 4)), timeout=5)]
    assert _sample(w, "llmfabric_worker_requests_total", finish_reason="length") == 1
    assert _sample(w, "llmfabric_worker_prompt_tokens_total") == 4
    assert _sample(w, "llmfabric_worker_generated_tokens_total") == 3
    assert _sample(w, "llmfabric_worker_time_to_first_token_seconds_count") == 1
    assert _sample(w, "llmfabric_worker_running") == 1  # the engine's own report

    fake_engine.hold_after_first = asyncio.Event()
    call = w.generate(make_tokenized("gone"))
    await asyncio.wait_for(call.read(), 5)
    call.cancel()
    await wait_until(lambda: _sample(w, "llmfabric_worker_requests_total", finish_reason="cancelled") == 1)

    fake_engine.hold_after_first = None
    fake_engine.fail = Unavailable("engine is not running")
    await _error(w.generate(make_tokenized("bad")))
    assert _sample(w, "llmfabric_worker_requests_total", finish_reason="error") == 1
    assert _sample(w, "llmfabric_worker_request_duration_seconds_count") == 3

"""ServiceHost end to end, in process: a real grpc.aio server on port 0 with
small test servicers. Covers the interceptor's error mapping, request ids,
health, reflection, /metrics and graceful drain."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.config import ServerSettings
from llmfabric.runtime.context import current_request_id, outgoing_metadata
from llmfabric.runtime.errors import (
    ERROR_TRAILER,
    RETRY_AFTER_TRAILER,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_from_rpc,
    info_from_trailers,
)
from llmfabric.runtime.health import check
from llmfabric.runtime.server import ServiceHost
from llmfabric.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from llmfabric.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

TOK_SERVICE = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
SCHED_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
SECRET = "secret-internal-detail-/etc/passwd"


class Behaviours(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """Tokenize's ``text`` picks what the handler does."""

    def __init__(self) -> None:
        self.downstream: str = ""  # address to relay to (this same server)

    async def Tokenize(self, request, context):
        what = request.text
        if what == "ok":
            return tokenizer_pb2.TokenizeResponse(token_ids=[1, 2, 3])
        if what == "invalid":
            raise InvalidArgument("sampling.temperature", "must be between 0 and 2, got 3")
        if what == "exhausted":
            raise ResourceExhausted("queue is full", retry_after_ms=1500)
        if what == "notfound":
            raise NotFound("model 'gpt-9' does not exist", field="model")
        if what == "unavailable":
            raise Unavailable("still loading")
        if what == "boom":
            raise RuntimeError(SECRET)
        if what == "abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler says no")
        if what.startswith("relay:"):
            # a downstream failure surfaces as AioRpcError, uncaught here
            async with grpc.aio.insecure_channel(self.downstream) as ch:
                stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
                return await stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=what[len("relay:") :]))
        if what.startswith("rebuild:"):
            async with grpc.aio.insecure_channel(self.downstream) as ch:
                stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
                try:
                    return await stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=what[len("rebuild:") :]))
                except grpc.aio.AioRpcError as err:
                    raise error_from_rpc(err) from None
        raise AssertionError(f"unknown behaviour {what!r}")

    async def Detokenize(self, request, context):
        await asyncio.sleep(0)  # let other RPCs interleave between set and read
        return tokenizer_pb2.DetokenizeResponse(text=current_request_id())

    async def GetModelInfo(self, request, context):
        """Calls downstream Detokenize with the propagated request id."""
        async with grpc.aio.insecure_channel(self.downstream) as ch:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
            resp = await stub.Detokenize(tokenizer_pb2.DetokenizeRequest(), metadata=outgoing_metadata())
        return tokenizer_pb2.GetModelInfoResponse(model=resp.text, chat_template=current_request_id())


class Streams(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Submit's request_id picks what the stream does."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = False

    async def Submit(self, request, context):
        mode = request.request.request_id
        if mode == "slow":
            yield scheduler_pb2.SubmitResponse(worker_id="0")
            self.started.set()
            await self.release.wait()
            for i in range(1, 4):
                yield scheduler_pb2.SubmitResponse(worker_id=str(i))
            self.finished = True
        elif mode == "three":
            for i in range(3):
                yield scheduler_pb2.SubmitResponse(worker_id=str(i))
        elif mode == "invalid-mid":
            yield scheduler_pb2.SubmitResponse(worker_id="0")
            raise InvalidArgument("sampling.stop[1]", "must not be empty")
        elif mode == "boom-mid":
            yield scheduler_pb2.SubmitResponse(worker_id="0")
            raise RuntimeError(SECRET)
        elif mode == "abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stream says no")
            yield scheduler_pb2.SubmitResponse()  # pragma: no cover - unreachable, makes this a generator
        else:
            raise AssertionError(mode)

    async def GetStatus(self, request, context):
        return scheduler_pb2.GetStatusResponse(queued=7)


@pytest.fixture(scope="module")
async def served():
    host = ServiceHost("testsvc", ServerSettings(port=0, metrics_port=0))
    svc = Behaviours()
    host.add(TOK_SERVICE, tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, svc)
    host.add(SCHED_SERVICE, scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, Streams())
    port = await host.start()
    svc.downstream = f"127.0.0.1:{port}"
    yield host, f"127.0.0.1:{port}"
    await host.drain(grace=0)


@pytest.fixture
async def channel(served):
    _, address = served
    async with grpc.aio.insecure_channel(address) as ch:
        yield ch


@pytest.fixture
def tok(channel):
    return tokenizer_pb2_grpc.TokenizerServiceStub(channel)


@pytest.fixture
def sched(channel):
    return scheduler_pb2_grpc.SchedulerServiceStub(channel)


async def fail(stub, text, metadata=()):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=text), metadata=metadata)
    return exc.value


def error_info(err: grpc.aio.AioRpcError) -> common_pb2.ErrorInfo:
    return info_from_trailers(err.trailing_metadata())


def trailer(err: grpc.aio.AioRpcError, key: str):
    return dict(err.trailing_metadata() or ()).get(key)


# ------------------------------------------------------------- basics


async def test_start_returns_bound_port(served):
    host, address = served
    assert host.port > 0
    assert address.endswith(f":{host.port}")
    assert host.metrics.port > 0


async def test_ok_call(tok):
    resp = await tok.Tokenize(tokenizer_pb2.TokenizeRequest(text="ok"))
    assert list(resp.token_ids) == [1, 2, 3]


# ------------------------------------------------------- error mapping


async def test_invalid_argument(tok):
    err = await fail(tok, "invalid")
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "sampling.temperature: must be between 0 and 2, got 3"
    info = error_info(err)
    assert info.field == "sampling.temperature"
    assert info.code == "INVALID_ARGUMENT"
    assert info.message == err.details()
    assert trailer(err, RETRY_AFTER_TRAILER) is None


async def test_resource_exhausted_carries_retry_after(tok):
    err = await fail(tok, "exhausted")
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "queue is full"
    assert error_info(err).retry_after_ms == 1500
    assert trailer(err, RETRY_AFTER_TRAILER) == "1500"
    assert isinstance(trailer(err, ERROR_TRAILER), bytes)


async def test_not_found_names_field(tok):
    err = await fail(tok, "notfound")
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert "gpt-9" in err.details()
    assert error_info(err).field == "model"


async def test_unavailable(tok):
    err = await fail(tok, "unavailable")
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert error_info(err).code == "UNAVAILABLE"


async def test_plain_exception_is_internal_without_leaking(tok, caplog):
    with caplog.at_level(logging.ERROR, logger="llmfabric.runtime.interceptors"):
        err = await fail(tok, "boom", metadata=(("x-request-id", "rid-boom"),))
    assert err.code() is grpc.StatusCode.INTERNAL
    assert SECRET not in err.details()
    assert "RuntimeError" not in err.details()
    assert "Tokenize" in err.details()
    assert "rid-boom" in err.details()  # the id to look the traceback up with
    info = error_info(err)
    assert info.code == "INTERNAL"
    assert SECRET not in info.message
    # ...but the traceback is in the server log
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and any(SECRET in str(r.exc_info[1]) for r in logged)


async def test_handler_abort_code_preserved(tok):
    err = await fail(tok, "abort")
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "handler says no"


# ------------------------------------------------------- relayed errors


@pytest.mark.parametrize("prefix", ["relay:", "rebuild:"])
async def test_relayed_invalid_argument_keeps_code_message_field(tok, prefix):
    err = await fail(tok, prefix + "invalid")
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "sampling.temperature: must be between 0 and 2, got 3"
    assert error_info(err).field == "sampling.temperature"


@pytest.mark.parametrize("prefix", ["relay:", "rebuild:"])
async def test_relayed_resource_exhausted_keeps_retry_after(tok, prefix):
    err = await fail(tok, prefix + "exhausted")
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(err).retry_after_ms == 1500
    assert trailer(err, RETRY_AFTER_TRAILER) == "1500"


async def test_relayed_not_found(tok):
    err = await fail(tok, "relay:notfound")
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert error_info(err).field == "model"


async def test_relayed_handler_abort_keeps_code(tok):
    err = await fail(tok, "relay:abort")
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "handler says no"


async def test_relayed_internal_stays_internal_and_opaque(tok):
    err = await fail(tok, "relay:boom")
    assert err.code() is grpc.StatusCode.INTERNAL
    assert SECRET not in err.details()


async def test_relay_twice(tok):
    err = await fail(tok, "relay:relay:invalid")
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err).field == "sampling.temperature"


# ------------------------------------------------------- request ids


async def test_request_id_reaches_handler(tok):
    resp = await tok.Detokenize(tokenizer_pb2.DetokenizeRequest(), metadata=(("x-request-id", "abc-123"),))
    assert resp.text == "abc-123"


async def test_request_id_generated_when_missing(tok):
    a = await tok.Detokenize(tokenizer_pb2.DetokenizeRequest())
    b = await tok.Detokenize(tokenizer_pb2.DetokenizeRequest())
    assert len(a.text) == 32 and len(b.text) == 32
    assert a.text != b.text


async def test_request_ids_isolated_between_concurrent_rpcs(tok):
    ids = [f"rid-{i}" for i in range(20)]
    resps = await asyncio.gather(
        *(tok.Detokenize(tokenizer_pb2.DetokenizeRequest(), metadata=(("x-request-id", r),)) for r in ids)
    )
    assert [r.text for r in resps] == ids


async def test_request_id_propagates_downstream(tok):
    resp = await tok.GetModelInfo(tokenizer_pb2.GetModelInfoRequest(), metadata=(("x-request-id", "hop-1"),))
    assert resp.chat_template == "hop-1"  # seen by the first hop
    assert resp.model == "hop-1"  # and by the downstream call


async def test_request_id_not_leaked_to_test_context(tok):
    await tok.Detokenize(tokenizer_pb2.DetokenizeRequest(), metadata=(("x-request-id", "leak?"),))
    assert current_request_id() != "leak?"


# ------------------------------------------------------- streaming


async def test_stream_ok(sched):
    call = sched.Submit(scheduler_pb2.SubmitRequest(request=common_pb2.TokenizedRequest(request_id="three")))
    got = [r.worker_id async for r in call]
    assert got == ["0", "1", "2"]
    assert await call.code() is grpc.StatusCode.OK


async def test_stream_domain_error_after_first_chunk(sched):
    call = sched.Submit(scheduler_pb2.SubmitRequest(request=common_pb2.TokenizedRequest(request_id="invalid-mid")))
    first = await call.read()
    assert first.worker_id == "0"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    err = exc.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err).field == "sampling.stop[1]"


async def test_stream_plain_exception_is_internal(sched):
    call = sched.Submit(scheduler_pb2.SubmitRequest(request=common_pb2.TokenizedRequest(request_id="boom-mid")))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in call:
            pass
    assert exc.value.code() is grpc.StatusCode.INTERNAL
    assert SECRET not in exc.value.details()


async def test_stream_abort_code_preserved(sched):
    call = sched.Submit(scheduler_pb2.SubmitRequest(request=common_pb2.TokenizedRequest(request_id="abort")))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in call:
            pass
    assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert exc.value.details() == "stream says no"


# ------------------------------------------------------- health


async def test_health_lifecycle(served):
    host, address = served
    await host.set_serving(False)
    assert await check(address) == "NOT_SERVING"
    assert await check(address, TOK_SERVICE) == "NOT_SERVING"
    await host.set_serving(True)
    assert await check(address) == "SERVING"
    assert await check(address, TOK_SERVICE) == "SERVING"
    assert await check(address, SCHED_SERVICE) == "SERVING"
    await host.set_serving(False)
    assert await check(address) == "NOT_SERVING"


async def test_health_unknown_service(served):
    _, address = served
    assert await check(address, "no.such.Service") == "UNREACHABLE: NOT_FOUND"


async def test_health_unreachable_address():
    # a port that nothing listens on: bind one, read its number, close it
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert (await check(f"127.0.0.1:{port}", timeout=1.0)).startswith("UNREACHABLE")


async def test_health_not_serving_right_after_start():
    host = ServiceHost("fresh", ServerSettings(port=0, metrics_port=-1))
    host.add(TOK_SERVICE, tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, Behaviours())
    port = await host.start()
    try:
        assert await check(f"127.0.0.1:{port}") == "NOT_SERVING"
        assert await check(f"127.0.0.1:{port}", TOK_SERVICE) == "NOT_SERVING"
        assert host.metrics.port == -1  # -1 disables the metrics endpoint
    finally:
        await host.drain(grace=0)


# ------------------------------------------------------- reflection


async def _reflect(channel, request):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return [r async for r in stub.ServerReflectionInfo(iter([request]))]


async def test_reflection_lists_services(channel):
    (resp,) = await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in resp.list_services_response.service}
    assert {TOK_SERVICE, SCHED_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_reflection_describes_service(channel):
    from google.protobuf import descriptor_pb2

    (resp,) = await _reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=TOK_SERVICE))
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in resp.file_descriptor_response.file_descriptor_proto]
    services = {f"{f.package}.{s.name}": [m.name for m in s.method] for f in files for s in f.service}
    assert "Tokenize" in services[TOK_SERVICE]


# ------------------------------------------------------- metrics


async def _metrics(host) -> dict[tuple[str, str, str], float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{host.metrics.port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "llmfabric_rpc_requests_total":
                out[(s.labels["service"], s.labels["method"], s.labels["code"])] = s.value
    return out


async def test_metrics_count_by_method_and_code(served, tok, sched):
    host, _ = served
    before = await _metrics(host)
    await tok.Tokenize(tokenizer_pb2.TokenizeRequest(text="ok"))
    await tok.Tokenize(tokenizer_pb2.TokenizeRequest(text="ok"))
    await fail(tok, "invalid")
    await fail(tok, "exhausted")
    await fail(tok, "boom")
    call = sched.Submit(scheduler_pb2.SubmitRequest(request=common_pb2.TokenizedRequest(request_id="three")))
    [_ async for _ in call]
    after = await _metrics(host)

    def delta(method, code):
        key = ("testsvc", method, code)
        return after.get(key, 0) - before.get(key, 0)

    assert delta("Tokenize", "OK") == 2
    assert delta("Tokenize", "INVALID_ARGUMENT") == 1
    assert delta("Tokenize", "RESOURCE_EXHAUSTED") == 1
    assert delta("Tokenize", "INTERNAL") == 1
    assert delta("Submit", "OK") == 1


async def test_metrics_skip_health_and_reflection(served, channel):
    host, address = served
    await check(address)
    await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    methods = {m for (_, m, _) in await _metrics(host)}
    assert "Check" not in methods
    assert "ServerReflectionInfo" not in methods


async def test_metrics_latency_histogram_present(served, tok):
    host, _ = served
    await tok.Tokenize(tokenizer_pb2.TokenizeRequest(text="ok"))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{host.metrics.port}/metrics") as resp:
            text = await resp.text()
    assert 'llmfabric_rpc_duration_seconds_count{method="Tokenize",service="testsvc"}' in text


# ------------------------------------------------------- drain


async def test_drain_finishes_in_flight_stream_and_refuses_new_rpcs():
    host = ServiceHost("drainsvc", ServerSettings(port=0, metrics_port=0))
    svc = Streams()
    host.add(SCHED_SERVICE, scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, svc)
    port = await host.start()
    address = f"127.0.0.1:{port}"
    await host.set_serving(True)
    drain_task = None
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            call = stub.Submit(scheduler_pb2.SubmitRequest(request=common_pb2.TokenizedRequest(request_id="slow")))
            first = await call.read()
            assert first.worker_id == "0"
            await svc.started.wait()

            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            drain_task = asyncio.create_task(host.drain(grace=60))
            # health flips to NOT_SERVING as the drain begins
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # otherwise the watch itself is an in-flight RPC the drain waits for

            # new RPCs are refused once the server stops accepting
            refused = None
            for _ in range(500):
                async with grpc.aio.insecure_channel(address) as fresh:
                    try:
                        await scheduler_pb2_grpc.SchedulerServiceStub(fresh).GetStatus(
                            scheduler_pb2.GetStatusRequest(), timeout=5
                        )
                    except grpc.aio.AioRpcError as err:
                        refused = err
                        break
                await asyncio.sleep(0.01)
            assert refused is not None, "the draining server kept accepting new RPCs"
            assert refused.code() is grpc.StatusCode.UNAVAILABLE
            assert not drain_task.done()  # still waiting for the in-flight stream

            # the in-flight stream completes normally
            svc.release.set()
            rest = []
            while (msg := await call.read()) is not grpc.aio.EOF:
                rest.append(msg.worker_id)
            assert rest == ["1", "2", "3"]
            assert await call.code() is grpc.StatusCode.OK
            assert svc.finished

            await drain_task
    finally:
        svc.release.set()
        if drain_task is None:
            await host.drain(grace=0)
        elif not drain_task.done():
            await drain_task

    assert host.draining
    # health stays NOT_SERVING: set_serving(True) is ignored once draining
    await host.set_serving(True)
    status = await host.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    status = await host.health.Check(health_pb2.HealthCheckRequest(service=SCHED_SERVICE), None)
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    # and the stopped server is gone
    assert (await check(address, timeout=1.0)).startswith("UNREACHABLE")
    # drain is idempotent
    await host.drain(grace=0)


async def test_drain_stops_metrics_endpoint():
    host = ServiceHost("metricsdrain", ServerSettings(port=0, metrics_port=0))
    await host.start()
    port = host.metrics.port
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
    await host.drain(grace=0)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                await resp.read()

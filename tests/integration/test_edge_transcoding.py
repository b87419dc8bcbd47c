"""The real Envoy edge in front of an in-test frontend.

A small grpc.aio InferenceService (with health and reflection) and a tiny
aiohttp OpenAI-style server stand in for the frontend; Envoy runs with the
rendered bootstrap on loopback ports chosen at run time. Everything is driven
through the edge: native gRPC, REST -> gRPC transcoding (SSE for streams),
OpenAI HTTP, CORS, error mapping, admin.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator

import aiohttp
import grpc
import pytest
import pytest_asyncio
from fabric_testing import envoy_ready, start_envoy, stop_process
import yarl
from aiohttp import web

ROOT = pathlib.Path(__file__).resolve().parents[2]
DESCRIPTOR = ROOT / "build" / "llmfabric.pb"



from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import (
    reflection,
    reflection_pb2,
    reflection_pb2_grpc,
)
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from llmfabric.common.v1 import common_pb2
from llmfabric.gateway import edge
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

SERVICE = "llmfabric.inference.v1.InferenceService"
GATE = web.AppKey(
    "gate", asyncio.Event
)  # a gated chat request waits here after event 1
ALLOWED_ORIGIN = "http://app.example"


class EchoInference(inference_pb2_grpc.InferenceServiceServicer):
    """Echoes prompts; the words "invalid"/"overload" make it fail."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()  # a prompt with "gated" waits here after chunk 1

    @staticmethod
    async def _check(prompt: str, context: grpc.aio.ServicerContext) -> None:
        if "invalid" in prompt.split():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not say invalid"
            )
        if "overload" in prompt.split():
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full, retry later"
            )

    @staticmethod
    def _request_id(context: grpc.aio.ServicerContext) -> str:
        return dict(context.invocation_metadata()).get("x-request-id", "")

    async def Generate(self, request, context):
        await self._check(request.prompt, context)
        return inference_pb2.GenerateResponse(
            text=request.prompt.upper(),
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(
                prompt_tokens=2, completion_tokens=2, total_tokens=4
            ),
            model="echo",
            request_id=self._request_id(context),
        )

    async def GenerateStream(self, request, context):
        await self._check(request.prompt, context)
        words = request.prompt.split()[:3]
        for i, word in enumerate(words):
            last = i == len(words) - 1
            yield inference_pb2.GenerateStreamResponse(
                text=word,
                finish_reason=common_pb2.FINISH_REASON_STOP if last else 0,
                usage=common_pb2.Usage(completion_tokens=len(words)) if last else None,
                model="echo",
                request_id=self._request_id(context),
                token_count=1,
            )
            if i == 0 and "gated" in request.prompt.split():
                await self.gate.wait()
        if "midfail" in request.prompt.split():
            await context.abort(grpc.StatusCode.INTERNAL, "engine died")

    async def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.Model(
                    name="echo", context_length=2048, owned_by="llmfabric"
                )
            ]
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest_asyncio.fixture(scope="module")
async def servicer() -> AsyncIterator[EchoInference]:
    yield EchoInference()


@pytest_asyncio.fixture(scope="module")
async def grpc_port(servicer: EchoInference) -> AsyncIterator[int]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(0)


@pytest_asyncio.fixture(scope="module")
async def http_app() -> AsyncIterator[tuple[web.Application, int]]:
    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "echo", "object": "model"}]}
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"delta":"one"}\n\n')
        if body.get("gated"):
            await request.app[GATE].wait()
        await resp.write(b'data: {"delta":"two"}\n\ndata: [DONE]\n\n')
        return resp

    app = web.Application()
    app[GATE] = asyncio.Event()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield app, port
    await runner.cleanup()


@dataclasses.dataclass
class Edge:
    """A running Envoy: its policy, admin port, process, and stderr file."""

    policy: edge.EdgePolicy
    admin_port: int
    proc: subprocess.Popen[bytes]
    stderr: pathlib.Path

    @property
    def listen_port(self) -> int:
        return self.policy.listen_port

    @property
    def access_log_path(self) -> str:
        return self.policy.access_log_path


@pytest.fixture(scope="module")
def envoy(
    grpc_port: int,
    http_app: tuple[web.Application, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Edge]:
    """Start the real Envoy in its own session; stop it (kill if need be) at the end.

    The edge is open (no API keys; test_edge_policies.py covers them) with a
    generous rate limit, so these tests see transcoding alone.
    """
    tmp = tmp_path_factory.mktemp("edge")
    policy = edge.EdgePolicy(
        descriptor_path=str(DESCRIPTOR),
        listen_port=_free_port(),
        access_log_path=str(tmp / "access.log"),
        cors_allow_origins=(ALLOWED_ORIGIN,),
        auth_required=False,
        rate_limit=edge.RateLimit(requests_per_second=1000, burst=1000),
    )
    admin_port = _free_port()
    config = tmp / "envoy.yaml"
    config.write_text(
        edge.render_static_bootstrap(
            policy,
            ("127.0.0.1", grpc_port),
            ("127.0.0.1", http_app[1]),
            "127.0.0.1",
            admin_port,
        )
    )
    edge.validate_config(str(config))
    proc = start_envoy(config, tmp)
    try:
        yield Edge(policy, admin_port, proc, tmp / "envoy.err")
    finally:
        stop_process(proc)


@pytest_asyncio.fixture(scope="module")
async def edge_cfg(envoy: Edge) -> Edge:
    """The running edge, once its admin /ready answers 200."""
    await envoy_ready(envoy.admin_port, envoy.proc, envoy.stderr)
    return envoy


@pytest_asyncio.fixture
async def http(edge_cfg: Edge) -> AsyncIterator[aiohttp.ClientSession]:
    base = f"http://127.0.0.1:{edge_cfg.listen_port}"
    async with aiohttp.ClientSession(base_url=base) as session:
        yield session


@pytest_asyncio.fixture
async def channel(edge_cfg: Edge) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge_cfg.listen_port}") as ch:
        yield ch


# --- native gRPC through the edge -------------------------------------------------------


async def test_grpc_unary_and_request_id(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    resp = await stub.Generate(
        inference_pb2.GenerateRequest(prompt="hi there"),
        metadata=[("x-request-id", "grpc-1")],
    )
    assert (resp.text, resp.model, resp.request_id) == ("HI THERE", "echo", "grpc-1")
    generated = await stub.Generate(inference_pb2.GenerateRequest(prompt="x"))
    assert len(generated.request_id) == 36  # a UUID made up by Envoy


async def test_grpc_server_stream(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.GenerateStreamRequest(prompt="a b c d")
    chunks = [c async for c in stub.GenerateStream(request)]
    assert [c.text for c in chunks] == ["a", "b", "c"]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_grpc_errors_pass_through(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(inference_pb2.GenerateRequest(prompt="overload"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == "queue full, retry later"


async def test_grpc_health_through_edge(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpc_reflection_through_edge(
    channel: grpc.aio.Channel, edge_cfg: Edge
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = [
        s.name
        async for resp in stub.ServerReflectionInfo(requests())
        for s in resp.list_services_response.service
    ]
    assert {SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME} <= set(names)

    def describe() -> list[str]:  # what grpcurl does, with the stock client
        with grpc.insecure_channel(f"127.0.0.1:{edge_cfg.listen_port}") as sync_channel:
            db = ProtoReflectionDescriptorDatabase(sync_channel)
            assert SERVICE in db.get_services()
            file = db.FindFileContainingSymbol(SERVICE)
            return [m.name for m in file.service[0].method]

    assert "GenerateStream" in await asyncio.to_thread(describe)


async def test_unknown_grpc_method_reaches_upstream(channel: grpc.aio.Channel) -> None:
    # grpcurl asks grpc.reflection.v1 first and falls back to v1alpha on
    # UNIMPLEMENTED: that answer must come from the server, not from the edge.
    call = channel.unary_unary(
        "/grpc.reflection.v1.ServerReflection/Nope",
        request_serializer=lambda m: m,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.value.details() == "Method not found!"  # grpc-python, not Envoy


# --- REST -> gRPC transcoding -------------------------------------------------------------


async def test_rest_unary(http: aiohttp.ClientSession) -> None:
    async with http.post(
        "/api/v1/generate",
        json={"prompt": "hi there"},
        headers={"x-request-id": "rest-1"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"] == "application/json"
        assert resp.headers["x-request-id"] == "rest-1"
        assert await resp.json() == {
            "text": "HI THERE",
            "finish_reason": "FINISH_REASON_STOP",
            "usage": {
                "prompt_tokens": 2,
                "completion_tokens": 2,
                "total_tokens": 4,
                "cached_tokens": 0,
            },
            "model": "echo",
            "request_id": "rest-1",
        }


async def test_rest_optional_fields_and_unknowns(http: aiohttp.ClientSession) -> None:
    body = {
        "prompt": "x",
        "options": {"sampling": {"temperature": 0, "seed": "7"}},
        "unknown": 1,
    }
    async with http.post("/api/v1/generate?utm=1", json=body) as resp:
        assert resp.status == 200  # unknown JSON fields and query params are ignored


async def test_rest_stream_is_sse(http: aiohttp.ClientSession) -> None:
    async with http.post(
        "/api/v1/generate:stream",
        json={"prompt": "a b c d"},
        headers={"x-request-id": "sse-1"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"] == "text/event-stream"
        raw = await resp.read()
    # Exact framing: "data: " + compact JSON (fields in proto order, proto
    # names, enums as names, zero values printed, unset messages omitted) + a
    # blank line; no "event:"/"id:" lines, no trailing terminator event.
    tail = '"model":"echo","request_id":"sse-1","token_count":1}'
    usage = '"usage":{"prompt_tokens":0,"completion_tokens":3,"total_tokens":0,"cached_tokens":0},'
    events = [
        '{"text":"a","finish_reason":"FINISH_REASON_UNSPECIFIED",' + tail,
        '{"text":"b","finish_reason":"FINISH_REASON_UNSPECIFIED",' + tail,
        '{"text":"c","finish_reason":"FINISH_REASON_STOP",' + usage + tail,
    ]
    assert raw == b"".join(b"data: " + e.encode() + b"\n\n" for e in events)


async def test_rest_stream_is_not_buffered(
    http: aiohttp.ClientSession, servicer: EchoInference
) -> None:
    servicer.gate.clear()
    async with http.post(
        "/api/v1/generate:stream", json={"prompt": "gated x y"}
    ) as resp:
        first = await resp.content.readuntil(
            b"\n\n"
        )  # arrives while the server is blocked
        assert json.loads(first.removeprefix(b"data: "))["text"] == "gated"
        servicer.gate.set()
        rest = await resp.read()
    assert rest.count(b"data: ") == 2


async def test_rest_stream_failure_midway_ends_stream(
    http: aiohttp.ClientSession,
) -> None:
    async with http.post(
        "/api/v1/generate:stream", json={"prompt": "x y midfail"}
    ) as resp:
        assert (
            resp.status == 200
        )  # headers were already sent: the error cannot change it
        raw = await resp.read()
    assert raw.count(b"data: ") == 3 and raw.endswith(b"\n\n")


async def test_rest_list_models(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/models") as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "models": [
                {"name": "echo", "context_length": 2048, "owned_by": "llmfabric"}
            ]
        }


@pytest.mark.parametrize(
    ("path", "prompt", "status", "code", "message"),
    [
        ("/api/v1/generate", "invalid", 400, 3, "prompt: must not say invalid"),
        ("/api/v1/generate", "overload", 429, 8, "queue full, retry later"),
        ("/api/v1/generate:stream", "overload", 429, 8, "queue full, retry later"),
    ],
)
async def test_rest_grpc_errors(
    http: aiohttp.ClientSession,
    path: str,
    prompt: str,
    status: int,
    code: int,
    message: str,
) -> None:
    async with http.post(path, json={"prompt": prompt}) as resp:
        assert resp.status == status
        assert resp.headers["content-type"] == "application/json"
        assert await resp.json() == {"code": code, "message": message, "details": []}


@pytest.mark.parametrize(
    "body",
    [b'{"prompt":', b'{"prompt": 5}', b"[1]", b'{"options": {"priority": "NOPE"}}'],
)
async def test_rest_bad_json_is_400(http: aiohttp.ClientSession, body: bytes) -> None:
    headers = {"content-type": "application/json"}
    async with http.post("/api/v1/generate", data=body, headers=headers) as resp:
        assert resp.status == 400
        assert resp.headers["content-type"] == "application/json"
        error = await resp.json()
    assert error["code"] == 3 and error["message"] and error["details"] == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/generate"),
        ("POST", "/api/v1/generate%3Astream"),
        ("GET", "/nope"),
    ],
)
async def test_rest_unknown_route_is_404(
    http: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with http.request(method, yarl.URL(path, encoded=True)) as resp:
        assert resp.status == 404
        assert (await resp.json())["code"] == 5


# --- OpenAI HTTP --------------------------------------------------------------------------


async def test_openai_models(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/models") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"][0]["id"] == "echo"


async def test_openai_chat_stream_is_not_buffered(
    http: aiohttp.ClientSession, http_app: tuple[web.Application, int]
) -> None:
    gate: asyncio.Event = http_app[0][GATE]
    gate.clear()
    async with http.post("/v1/chat/completions", json={"gated": True}) as resp:
        assert resp.headers["content-type"] == "text/event-stream"
        assert await resp.content.readuntil(b"\n\n") == b'data: {"delta":"one"}\n\n'
        gate.set()
        assert await resp.read() == b'data: {"delta":"two"}\n\ndata: [DONE]\n\n'


# --- CORS, admin, access log --------------------------------------------------------------


async def test_cors_preflight(http: aiohttp.ClientSession) -> None:
    headers = {
        "origin": ALLOWED_ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-priority",
    }
    async with http.options("/api/v1/generate:stream", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "POST" in resp.headers["access-control-allow-methods"]
        assert "x-priority" in resp.headers["access-control-allow-headers"]


async def test_cors_on_responses(http: aiohttp.ClientSession) -> None:
    body = {"prompt": "x"}
    async with http.post(
        "/api/v1/generate", json=body, headers={"origin": ALLOWED_ORIGIN}
    ) as resp:
        assert resp.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "grpc-status" in resp.headers["access-control-expose-headers"]
    other = {"origin": "http://evil.example"}
    async with http.post("/api/v1/generate", json=body, headers=other) as resp:
        assert "access-control-allow-origin" not in resp.headers


async def test_admin_prometheus(edge_cfg: Edge) -> None:
    url = f"http://127.0.0.1:{edge_cfg.admin_port}/stats/prometheus"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
    assert resp.status == 200
    assert "envoy_cluster_upstream_rq_total" in text
    assert 'envoy_cluster_name="frontend_grpc"' in text


async def test_access_log_is_json(http: aiohttp.ClientSession, edge_cfg: Edge) -> None:
    headers = {"x-request-id": "log-1"}
    async with http.post(
        "/api/v1/generate", json={"prompt": "x"}, headers=headers
    ) as resp:
        assert resp.status == 200
    log = pathlib.Path(edge_cfg.access_log_path)
    entry = None
    for _ in range(200):  # Envoy flushes the file every 50 ms (see envoy_ports)
        lines = log.read_text().splitlines() if log.exists() else []
        entry = next((json.loads(x) for x in lines if '"log-1"' in x), None)
        if entry:
            break
        await asyncio.sleep(0.05)
    assert entry is not None
    assert entry["method"] == "POST" and entry["path"] == "/api/v1/generate"
    assert entry["upstream_path"] == f"/{SERVICE}/Generate"
    assert entry["status"] == 200 and entry["grpc_status"] == "OK"
    assert entry["upstream_cluster"] == "frontend_grpc" and entry["upstream_host"]
    assert isinstance(entry["duration_ms"], int)

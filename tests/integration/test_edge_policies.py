"""Edge policies through the real Envoy: API keys, tenant header, rate limits,
CORS, request size, access log.

Upstreams are in-test: a grpc.aio InferenceService whose Generate answers with
the metadata it received (plus health), and an aiohttp app that answers any
``/v1/`` request with the headers it received. Two Envoys run the static
bootstrap on loopback ports chosen at run time: one with API keys and
per-tenant rate limits, one open (auth_required=False).
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
from aiohttp import web

ROOT = pathlib.Path(__file__).resolve().parents[2]
DESCRIPTOR = ROOT / "build" / "llmfabric.pb"



from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from llmfabric.gateway import edge
from llmfabric.gateway.apikeys import ApiKey, generate_api_key
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

ALLOWED_ORIGIN = "http://app.example"
ACME = ApiKey(generate_api_key(), "acme")
BETA = ApiKey(generate_api_key(), "beta")
SLOW_HTTP = ApiKey(generate_api_key(), "slow-http")  # 1 request/s, burst 2
SLOW_GRPC = ApiKey(generate_api_key(), "slow-grpc")  # 1 request/s, burst 1
WRONG = generate_api_key()
MAX_BODY = 4096


class EchoMetadata(inference_pb2_grpc.InferenceServiceServicer):
    """Generate answers with JSON of the request metadata (key -> list of values)."""

    async def Generate(self, request, context):
        seen: dict[str, list[str]] = {}
        for key, value in context.invocation_metadata():
            seen.setdefault(key, []).append(
                value if isinstance(value, str) else "<bin>"
            )
        return inference_pb2.GenerateResponse(text=json.dumps(seen), model="echo")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest_asyncio.fixture(scope="module")
async def grpc_port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(EchoMetadata(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(0)


@pytest_asyncio.fixture(scope="module")
async def http_port() -> AsyncIterator[int]:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        headers: dict[str, list[str]] = {}
        for key, value in request.headers.items():
            headers.setdefault(key.lower(), []).append(value)
        return web.json_response({"headers": headers, "body_bytes": len(body)})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/v1/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


@dataclasses.dataclass
class Edge:
    """A running Envoy: where it listens, its access log, its stderr."""

    port: int
    admin_port: int
    access_log: pathlib.Path
    proc: subprocess.Popen[bytes]
    stderr: pathlib.Path


def _start(
    policy: edge.EdgePolicy, grpc_port: int, http_port: int, tmp: pathlib.Path
) -> Edge:
    admin_port = _free_port()
    config = tmp / "envoy.yaml"
    config.write_text(
        edge.render_static_bootstrap(
            policy,
            ("127.0.0.1", grpc_port),
            ("127.0.0.1", http_port),
            "127.0.0.1",
            admin_port,
        )
    )
    proc = start_envoy(config, tmp)
    return Edge(
        policy.listen_port,
        admin_port,
        pathlib.Path(policy.access_log_path),
        proc,
        tmp / "envoy.err",
    )


def _stop(running: Edge) -> None:
    stop_process(running.proc)


async def _ready(running: Edge) -> Edge:
    await envoy_ready(running.admin_port, running.proc, running.stderr)
    return running


@pytest.fixture(scope="module")
def secured_proc(
    grpc_port: int, http_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("edge-secured")
    policy = edge.EdgePolicy(
        descriptor_path=str(DESCRIPTOR),
        listen_port=_free_port(),
        access_log_path=str(tmp / "access.log"),
        cors_allow_origins=(ALLOWED_ORIGIN,),
        api_keys=(ACME, BETA, SLOW_HTTP, SLOW_GRPC),
        rate_limit=edge.RateLimit(requests_per_second=1000, burst=1000),
        tenant_rate_limits=(
            ("slow-http", edge.RateLimit(requests_per_second=1, burst=2)),
            ("slow-grpc", edge.RateLimit(requests_per_second=1, burst=1)),
        ),
        max_request_bytes=MAX_BODY,
    )
    running = _start(policy, grpc_port, http_port, tmp)
    try:
        yield running
    finally:
        _stop(running)


@pytest.fixture(scope="module")
def open_proc(
    grpc_port: int, http_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("edge-open")
    policy = edge.EdgePolicy(
        descriptor_path=str(DESCRIPTOR),
        listen_port=_free_port(),
        access_log_path=str(tmp / "access.log"),
        auth_required=False,
    )
    running = _start(policy, grpc_port, http_port, tmp)
    try:
        yield running
    finally:
        _stop(running)


@pytest_asyncio.fixture(scope="module")
async def secured(secured_proc: Edge) -> Edge:
    return await _ready(secured_proc)


@pytest_asyncio.fixture(scope="module")
async def open_edge(open_proc: Edge) -> Edge:
    return await _ready(open_proc)


@pytest_asyncio.fixture
async def http(secured: Edge) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{secured.port}"
    ) as session:
        yield session


@pytest_asyncio.fixture
async def channel(secured: Edge) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        yield ch


def _bearer(key: ApiKey | str) -> dict[str, str]:
    return {"authorization": f"Bearer {key.key if isinstance(key, ApiKey) else key}"}


async def _generate(
    channel: grpc.aio.Channel, metadata: list[tuple[str, str]], prompt: str = "x"
) -> dict[str, list[str]]:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    resp = await stub.Generate(
        inference_pb2.GenerateRequest(prompt=prompt), metadata=metadata
    )
    return json.loads(resp.text)


# --- authentication -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, _bearer(WRONG), {"x-api-key": WRONG}, {"authorization": WRONG}]
)
async def test_openai_without_valid_key_is_401(
    http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with http.post("/v1/chat/completions", json={}, headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["content-type"] == "application/json"
        body = await resp.json()
    assert body["error"]["code"] == 401 and body["error"]["message"]


async def test_rest_without_key_is_401_status_shape(
    http: aiohttp.ClientSession,
) -> None:
    async with http.post("/api/v1/generate", json={"prompt": "x"}) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["code"] == 16 and body["message"] and body["details"] == []


@pytest.mark.parametrize("metadata", [[], [("authorization", f"Bearer {WRONG}")]])
async def test_grpc_without_valid_key_is_unauthenticated(
    channel: grpc.aio.Channel, metadata: list[tuple[str, str]]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(channel, metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bearer_key_sets_tenant_and_hides_key(
    http: aiohttp.ClientSession,
) -> None:
    headers = {**_bearer(ACME), "x-tenant-id": "evil", "x-request-id": "auth-bearer"}
    async with http.post("/v1/chat/completions", json={}, headers=headers) as resp:
        assert resp.status == 200
        seen = (await resp.json())["headers"]
    assert seen["x-tenant-id"] == ["acme"]  # the client's own value is gone
    assert "authorization" not in seen and "x-api-key" not in seen


async def test_x_api_key_sets_tenant_and_hides_key(http: aiohttp.ClientSession) -> None:
    headers = {"x-api-key": BETA.key, "x-tenant-id": "acme"}
    async with http.get("/v1/models", headers=headers) as resp:
        assert resp.status == 200
        seen = (await resp.json())["headers"]
    assert seen["x-tenant-id"] == ["beta"]
    assert "authorization" not in seen and "x-api-key" not in seen


async def test_underscore_tenant_header_is_dropped(http: aiohttp.ClientSession) -> None:
    async with http.get(
        "/v1/models", headers={**_bearer(ACME), "x_tenant_id": "evil"}
    ) as resp:
        seen = (await resp.json())["headers"]
    assert "x_tenant_id" not in seen and seen["x-tenant-id"] == ["acme"]


async def test_grpc_key_sets_tenant_and_hides_key(channel: grpc.aio.Channel) -> None:
    seen = await _generate(
        channel, [("authorization", f"Bearer {ACME.key}"), ("x-tenant-id", "evil")]
    )
    assert seen["x-tenant-id"] == ["acme"]
    assert "authorization" not in seen
    seen = await _generate(channel, [("x-api-key", BETA.key)])
    assert seen["x-tenant-id"] == ["beta"] and "x-api-key" not in seen


async def test_rest_transcoded_carries_tenant(http: aiohttp.ClientSession) -> None:
    headers = {**_bearer(BETA), "x-tenant-id": "evil"}
    async with http.post(
        "/api/v1/generate", json={"prompt": "x"}, headers=headers
    ) as resp:
        assert resp.status == 200
        seen = json.loads((await resp.json())["text"])
    assert seen["x-tenant-id"] == ["beta"] and "authorization" not in seen


async def test_grpc_health_needs_no_key(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/../llmfabric.inference.v1.InferenceService/Generate",
        "/grpc.health.v1.Health/Check/../../llmfabric.inference.v1.InferenceService/Generate",
        "/grpc.health.v1.Health/Nope",
    ],
)
async def test_health_route_is_no_way_around_auth(
    channel: grpc.aio.Channel, method: str
) -> None:
    call = channel.unary_unary(
        method, request_serializer=lambda m: m, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(inference_pb2.GenerateRequest(prompt="x").SerializeToString())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- open edge (auth_required=False) ------------------------------------------------------


async def test_open_edge_removes_client_tenant(open_edge: Edge) -> None:
    base = f"http://127.0.0.1:{open_edge.port}"
    async with (
        aiohttp.ClientSession(base_url=base) as session,
        session.get("/v1/models", headers={"x-tenant-id": "evil"}) as resp,
    ):
        assert resp.status == 200
        seen = (await resp.json())["headers"]
    assert "x-tenant-id" not in seen
    async with grpc.aio.insecure_channel(f"127.0.0.1:{open_edge.port}") as ch:
        assert "x-tenant-id" not in await _generate(ch, [("x-tenant-id", "evil")])


# --- rate limits --------------------------------------------------------------------------


async def test_rate_limit_http_429_per_tenant(http: aiohttp.ClientSession) -> None:
    statuses = []
    for _ in range(6):
        async with http.get("/v1/models", headers=_bearer(SLOW_HTTP)) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                limited = (resp.headers.copy(), await resp.json())
    assert statuses[0] == 200 and 429 in statuses, statuses
    headers, body = limited
    assert headers.get("retry-after") == "1", dict(headers)
    assert body["error"]["code"] == 429
    # Another tenant has its own bucket.
    async with http.get("/v1/models", headers=_bearer(ACME)) as resp:
        assert resp.status == 200


async def test_rate_limit_rest_429_status_shape(http: aiohttp.ClientSession) -> None:
    statuses = []
    for _ in range(6):
        async with http.post(
            "/api/v1/generate", json={"prompt": "x"}, headers=_bearer(SLOW_HTTP)
        ) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                body = await resp.json()
    assert 429 in statuses, statuses
    assert body["code"] == 8


async def test_rate_limit_grpc_resource_exhausted(channel: grpc.aio.Channel) -> None:
    metadata = [("authorization", f"Bearer {SLOW_GRPC.key}")]
    errors = []
    for _ in range(4):
        try:
            await _generate(channel, metadata)
        except grpc.aio.AioRpcError as err:
            errors.append(err)
    assert errors, "never rate limited"
    assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    # A trailers-only reply: grpc-python reports its headers as trailing metadata.
    assert dict(errors[0].trailing_metadata() or ()).get("retry-after") == "1"
    assert (await _generate(channel, [("authorization", f"Bearer {BETA.key}")]))[
        "x-tenant-id"
    ]


async def test_grpc_health_is_not_rate_limited(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(20):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


# --- CORS ---------------------------------------------------------------------------------


async def test_cors_preflight_needs_no_key(http: aiohttp.ClientSession) -> None:
    headers = {
        "origin": ALLOWED_ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    async with http.options("/v1/chat/completions", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        allowed = resp.headers["access-control-allow-headers"]
    assert "authorization" in allowed and "x-api-key" in allowed


async def test_cors_preflight_from_other_origin_gets_no_cors(
    http: aiohttp.ClientSession,
) -> None:
    headers = {"origin": "http://evil.example", "access-control-request-method": "POST"}
    async with http.options("/v1/chat/completions", headers=headers) as resp:
        assert "access-control-allow-origin" not in resp.headers
        assert resp.status != 401


async def test_cors_headers_on_401_and_exposed(http: aiohttp.ClientSession) -> None:
    async with http.post(
        "/v1/chat/completions", json={}, headers={"origin": ALLOWED_ORIGIN}
    ) as resp:
        assert resp.status == 401  # a browser can read why
        assert resp.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    headers = {"origin": ALLOWED_ORIGIN, **_bearer(ACME)}
    async with http.get("/v1/models", headers=headers) as resp:
        exposed = resp.headers["access-control-expose-headers"]
    for name in ("retry-after", "x-llmfabric-cache", "x-llmfabric-cache-similarity"):
        assert name in exposed


# --- request size -------------------------------------------------------------------------


async def test_oversized_body_is_413(http: aiohttp.ClientSession) -> None:
    big = {"prompt": "x" * (MAX_BODY + 100)}
    async with http.post(
        "/v1/chat/completions", json=big, headers=_bearer(ACME)
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == 413
    async with http.post("/api/v1/generate", json=big, headers=_bearer(ACME)) as resp:
        assert resp.status == 413
        assert (await resp.json())["code"] == 8
    small = {"prompt": "x" * (MAX_BODY // 2)}
    async with http.post(
        "/v1/chat/completions", json=small, headers=_bearer(ACME)
    ) as resp:
        assert resp.status == 200


async def test_oversized_chunked_body_is_413(http: aiohttp.ClientSession) -> None:
    async def chunks():
        for _ in range(8):
            yield b"x" * 1024

    async with http.post(
        "/v1/chat/completions", data=chunks(), headers=_bearer(ACME)
    ) as resp:
        assert resp.status == 413


async def test_oversized_grpc_message_is_resource_exhausted(
    channel: grpc.aio.Channel,
) -> None:
    # Larger than one HTTP/2 DATA frame (16 KiB): the limit is checked on what
    # is buffered before the frame that ends the stream.
    prompt = "x" * (MAX_BODY + 32 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(channel, [("authorization", f"Bearer {ACME.key}")], prompt)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- access log ---------------------------------------------------------------------------


async def test_access_log_has_request_id_and_tenant_but_no_key(
    http: aiohttp.ClientSession, secured: Edge
) -> None:
    headers = {**_bearer(ACME), "x-request-id": "policy-log-1"}
    async with http.get("/v1/models", headers=headers) as resp:
        assert resp.status == 200
    async with http.get(
        "/v1/models", headers={"x-api-key": WRONG, "x-request-id": "policy-log-2"}
    ):
        pass
    entries: dict[str, dict] = {}
    for _ in range(200):  # Envoy flushes the file every 50 ms
        text = secured.access_log.read_text() if secured.access_log.exists() else ""
        entries = {
            e["request_id"]: e
            for e in map(json.loads, text.splitlines())
            if e["request_id"].startswith("policy-log-")
        }
        if len(entries) == 2:
            break
        await asyncio.sleep(0.05)
    assert entries["policy-log-1"]["tenant"] == "acme"
    assert entries["policy-log-1"]["status"] == 200
    assert entries["policy-log-2"]["status"] == 401
    assert entries["policy-log-2"]["tenant"] is None
    for key in (ACME.key, BETA.key, WRONG):
        assert key not in text

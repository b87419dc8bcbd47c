"""The fabric assembled by Consul, through the real Envoy: every service
registers with the Consul agent stand-in (tests/fakes/consul_agent.py, run as
its own process so it can be killed), consumers follow it, the xDS control
plane renders it into Envoy's clusters, and the edge enforces its policies
(API keys, per-tenant rate limits, CORS, body size). The tests run in file
order: the last ones kill a worker and then Consul itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request

import aiohttp
import grpc
import pytest
from fabric_testing import bearer, edge_channel, eventually

from llmfabric.cli.processes import free_port
from llmfabric.cli.stack import Stack, StackOptions
from llmfabric.common.v1 import common_pb2
from llmfabric.gateway.apikeys import generate_api_key
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

KEY, LIMITED_KEY = generate_api_key(), generate_api_key()
WAIT = 30.0  # bound on anything Consul-driven (1 s checks, 2-core machine under load)
LONG = [common_pb2.ChatMessage(role="system", content="You are a helpful assistant."),
        common_pb2.ChatMessage(role="user", content="Write a long story about a lighthouse keeper.")]


@pytest.fixture(scope="module")
def fabric(consul, tmp_path_factory):
    opts = StackOptions(
        workers=2, frontends=2, routing="round_robin", discovery="consul", consul_url=consul.url,
        edge_port=free_port(), admin_port=free_port(), state_dir=tmp_path_factory.mktemp("consul-stack"),
        drain_seconds=3.0, semcache=False, api_keys=f"{KEY}:itest,{LIMITED_KEY}:limited",
        rate_limit_rps=50, rate_limit_burst=100, tenant_rate_limits="limited=0.2:2",
    )
    st = Stack(opts)
    asyncio.run(st.start())
    yield st
    st.stop()


def _edge(fabric: Stack) -> str:
    return f"127.0.0.1:{fabric.opts.edge_port}"


def _admin(fabric: Stack, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{fabric.opts.admin_port}{path}", timeout=5) as resp:  # noqa: S310
        return resp.read().decode()


def _eds_hosts(fabric: Stack, cluster: str) -> set[str]:
    """Envoy's live endpoints of ``cluster`` (admin /clusters)."""
    hosts = set()
    for line in _admin(fabric, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) >= 3 and parts[0] == cluster and parts[2] == "cx_total":
            hosts.add(parts[1])
    return hosts


async def _chat(stub, text: str = "Hi", max_tokens: int = 4) -> inference_pb2.ChatResponse:
    return await stub.Chat(inference_pb2.ChatRequest(
        messages=[LONG[0], common_pb2.ChatMessage(role="user", content=text)],
        options=inference_pb2.RequestOptions(sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0)),
    ), timeout=120)


async def test_every_service_registers_with_its_meta(fabric, consul):
    services = consul.get("/v1/agent/services")
    names = sorted(s["Service"] for s in services.values())
    assert names == ["frontend", "frontend", "scheduler", "tokenizer", "worker", "worker", "xds"]
    workers = [s for s in services.values() if s["Service"] == "worker"]
    assert {w["Meta"]["worker_id"] for w in workers} == {"worker-0", "worker-1"}
    assert all(w["Meta"]["engine"] == "embedded" and int(w["Meta"]["capacity"]) == 4 and w["Meta"]["model"] for w in workers)
    fronts = [s for s in services.values() if s["Service"] == "frontend"]
    assert sorted(f"{f['Address']}:{f['Meta']['http_port']}" for f in fronts) == sorted(
        s.http for s in fabric.of_kind("frontend"))
    checks = consul.get("/v1/agent/checks")
    assert len(checks) == 7 and all(c["Type"] == "grpc" and c["Status"] == "passing" for c in checks.values())


async def test_envoy_clusters_come_from_the_control_plane(fabric):
    dump = json.loads(_admin(fabric, "/config_dump"))
    by_type = {c["@type"].rsplit(".", 1)[-1]: c for c in dump["configs"]}
    assert not by_type["ClustersConfigDump"].get("static_clusters", [{}])[0].get("cluster", {}).get("name", "").startswith("frontend")
    dynamic = {c["cluster"]["name"] for c in by_type["ClustersConfigDump"]["dynamic_active_clusters"]}
    assert dynamic == {"frontend_grpc", "frontend_http"}
    assert [x["name"] for x in by_type["ListenersConfigDump"]["dynamic_listeners"]] == ["edge"]
    fronts = fabric.of_kind("frontend")
    await eventually(lambda: _eds_hosts(fabric, "frontend_grpc") == {s.grpc for s in fronts}, WAIT, "gRPC endpoints")
    await eventually(lambda: _eds_hosts(fabric, "frontend_http") == {s.http for s in fronts}, WAIT, "HTTP endpoints")


async def test_authentication(fabric):
    edge = _edge(fabric)
    async with aiohttp.ClientSession(f"http://{edge}") as http:
        for headers in ({}, bearer("lf-" + "x" * 40), {"x-api-key": "not-a-key-of-ours-at-all"}):
            async with http.get("/v1/models", headers=headers) as resp:
                assert resp.status == 401, headers
                assert (await resp.json())["error"]["code"] == 401
        for headers in (bearer(KEY), {"x-api-key": KEY}):
            async with http.get("/v1/models", headers=headers) as resp:
                assert resp.status == 200
    async with edge_channel(edge, None) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await inference_pb2_grpc.InferenceServiceStub(ch).ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with edge_channel(edge, KEY) as ch:
        resp = await inference_pb2_grpc.InferenceServiceStub(ch).ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        assert resp.models


async def test_spoofed_tenant_header_is_replaced(fabric):
    """The tenant comes from the key: a client's own x-tenant-id never reaches the services."""
    async with edge_channel(_edge(fabric), KEY) as ch:
        await inference_pb2_grpc.InferenceServiceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), metadata=(("x-tenant-id", "someone-else"),), timeout=10)
    log = fabric.state_dir / "logs" / "access.log"

    def logged():
        lines = [json.loads(x) for x in log.read_text().splitlines() if "ListModels" in x] if log.exists() else []
        return lines and lines[-1]["tenant"] == "itest"

    await eventually(logged, 10, "access log line with the key's tenant")
    assert "someone-else" not in log.read_text()
    assert KEY not in log.read_text()


async def test_per_tenant_rate_limit(fabric):
    edge = _edge(fabric)
    codes = []
    async with edge_channel(edge, LIMITED_KEY) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        for _ in range(4):
            try:
                await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
                codes.append("OK")
            except grpc.aio.AioRpcError as err:
                codes.append(err.code().name)
    assert "RESOURCE_EXHAUSTED" in codes, codes
    async with aiohttp.ClientSession(f"http://{edge}") as http:
        async with http.get("/v1/models", headers=bearer(LIMITED_KEY)) as resp:
            assert resp.status == 429
            assert int(resp.headers["retry-after"]) >= 1
        async with http.get("/v1/models", headers=bearer(KEY)) as resp:  # another tenant: its own bucket
            assert resp.status == 200


async def test_cors_preflight_and_oversized_body(fabric):
    async with aiohttp.ClientSession(f"http://{_edge(fabric)}") as http:
        async with http.options("/v1/chat/completions", headers={
                "origin": "https://app.example", "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type"}) as resp:
            assert resp.status == 200
            assert resp.headers["access-control-allow-origin"] == "https://app.example"
            assert "authorization" in resp.headers["access-control-allow-headers"]
        big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
        async with http.post("/v1/chat/completions", data=big,
                             headers={**bearer(KEY), "content-type": "application/json"}) as resp:
            assert resp.status == 413


async def test_frontend_leaving_and_returning_reaches_envoy(fabric, consul):
    """A frontend stopped gracefully deregisters; Envoy stops sending to it, traffic
    keeps flowing on the other; started again, it is back in Envoy's endpoints."""
    front = fabric.of_kind("frontend")[1]
    t0 = time.monotonic()
    front.child.signal(signal.SIGTERM)
    await eventually(lambda: front.grpc not in _eds_hosts(fabric, "frontend_grpc"), WAIT, "endpoint removed")
    removed = time.monotonic() - t0
    async with edge_channel(_edge(fabric), KEY) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        for _ in range(4):
            assert (await _chat(stub)).usage.completion_tokens >= 1
    front.child.proc.wait(30)
    t0 = time.monotonic()
    front.child.start(dict(os.environ))
    await eventually(lambda: front.grpc in _eds_hosts(fabric, "frontend_grpc"), WAIT + 60, "endpoint back")
    added = time.monotonic() - t0
    print(f"\nfrontend SIGTERM -> gone from Envoy EDS: {removed * 1000:.0f} ms; "
          f"restart -> back in Envoy EDS (includes process start and the first 1 s check): {added * 1000:.0f} ms")


async def test_killed_worker_is_dropped_everywhere(fabric, consul):
    """SIGKILL the worker serving a stream: the stream ends with a clean error,
    Consul marks it critical, and the next requests are served by the other."""
    async with edge_channel(_edge(fabric), KEY) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        call = stub.ChatStream(inference_pb2.ChatStreamRequest(messages=LONG, options=inference_pb2.RequestOptions(
            sampling=common_pb2.SamplingParams(max_tokens=1500, temperature=0.8))), timeout=120)
        await call.read()
        busy = [w for w in fabric.of_kind("worker") if await _running(w.grpc) > 0]
        assert len(busy) == 1
        victim = busy[0]
        victim.child.signal(signal.SIGKILL)
        rest = []
        while (resp := await call.read()) is not grpc.aio.EOF:
            rest.append(resp)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
        assert rest[-1].error.code == "UNAVAILABLE"
        await eventually(lambda: len(consul.passing("worker")) == 1, WAIT, "Consul marks the killed worker critical")
        assert consul.passing("worker")[0]["Service"]["Meta"]["worker_id"] != victim.name
        for _ in range(3):
            assert (await _chat(stub)).usage.completion_tokens >= 1


async def test_envoy_keeps_its_config_while_the_control_plane_is_down(fabric):
    """SIGKILL the control plane: Envoy serves on with its last config; restarted,
    the control plane is back in Envoy's ADS connection and in Consul."""
    xds = fabric.get("xds")
    xds.child.signal(signal.SIGKILL)
    xds.child.proc.wait(10)
    async with edge_channel(_edge(fabric), KEY) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        for _ in range(3):
            assert (await _chat(stub)).usage.completion_tokens >= 1
    stats = lambda: _admin(fabric, "/stats?filter=control_plane.connected_state")  # noqa: E731
    await eventually(lambda: "connected_state: 0" in stats(), WAIT, "Envoy noticed the control plane is gone")
    xds.child.start(dict(os.environ))
    await eventually(lambda: "connected_state: 1" in stats(), WAIT + 30, "Envoy reconnected to the control plane")
    async with edge_channel(_edge(fabric), KEY) as ch:
        assert (await _chat(inference_pb2_grpc.InferenceServiceStub(ch))).usage.completion_tokens >= 1


async def test_traffic_continues_when_consul_goes_away(fabric, consul):
    """Consul dies: everyone keeps its last known endpoints; when it comes back
    empty, every service registers again."""
    consul.kill()
    async with edge_channel(_edge(fabric), KEY) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        for _ in range(3):
            assert (await _chat(stub)).usage.completion_tokens >= 1
        consul.start()  # a fresh agent that knows nothing
        alive = [s for s in fabric.services if s.kind in ("tokenizer", "worker", "scheduler", "frontend", "controlplane")
                 and s.child.alive]
        await eventually(lambda: len(consul.get("/v1/agent/services")) == len(alive), WAIT, "everyone re-registered")
        await eventually(lambda: len(consul.passing("frontend")) == 2, WAIT, "checks passing again")
        assert (await _chat(stub)).usage.completion_tokens >= 1


async def _running(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        load = await worker_pb2_grpc.WorkerServiceStub(ch).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
    return load.running

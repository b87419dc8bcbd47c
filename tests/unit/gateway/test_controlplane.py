"""The xDS control plane (gateway/controlplane): its settings, the snapshot it renders
from a static or Consul catalog and the edge policy, key-file rotation, a real ADS
client over gRPC, health and metrics. No Envoy, no model."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import sys

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

FAKES = pathlib.Path(__file__).resolve().parents[2] / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))

from consul_agent import ConsulAgent
from fabric_testing import eventually
from llmfabric.gateway.controlplane.config import PREFIX, XdsConfig
from llmfabric.gateway.controlplane.server import ADS_SERVICE, create_server
from llmfabric.gateway.xds import CLUSTER, ENDPOINT, LISTENER
from llmfabric.runtime.config import ConfigError, load_config
from llmfabric.runtime.consul import Registration

WAIT = 15.0  # Consul checks run every second on a shared 2-core machine
READ_TIMEOUT = 20.0  # bound on one ADS read: a missing response fails, never hangs
KEY_A, KEY_B = "acme-key-0123456789", "beta-key-0123456789"
STATIC = {"FRONTEND": "127.0.0.1:9001,127.0.0.1:9000", "FRONTEND_HTTP": "127.0.0.1:8001", "AUTH": "false"}


def config(**values: str) -> XdsConfig:
    env = {PREFIX + k.upper(): str(v) for k, v in {"metrics_port": "-1", **values}.items()}
    return load_config(XdsConfig, PREFIX, [], environ=env)


@pytest.fixture
async def start():
    planes = []

    async def make(**values: str):
        plane, port = await create_server(config(**values))
        planes.append(plane)
        await plane.load()
        return plane, port

    yield make
    for plane in planes:
        await plane.close()
        await plane.host.server.stop(None)


def filters(plane) -> dict[str, dict]:
    """The edge listener's HTTP filters: name -> typed_config (as JSON)."""
    lis = json_format.MessageToDict(plane.ads.current.resources(LISTENER)["edge"], preserving_proto_field_name=True)
    hcm = lis["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"].rsplit(".", 1)[-1]: f["typed_config"] for f in hcm["http_filters"]}


def tenants(plane) -> list[str]:
    return sorted(c["client"] for c in filters(plane)["api_key_auth"]["credentials"])


def endpoints(plane, cluster: str) -> list[tuple[str, int]]:
    cla = plane.ads.current.resources(ENDPOINT)[cluster]
    return [(lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value)
            for loc in cla.endpoints for lb in loc.lb_endpoints]


def metrics(plane) -> dict[str, float]:
    text = generate_latest(plane.host.registry).decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


# ----------------------------------------------------------------- settings
def test_valid_static_and_consul_configs():
    cfg = config(**STATIC, api_keys_file="/run/keys", tenant_rate_limits="acme=5:10", keys_poll_seconds="0.5",
                 cors_origins="https://a.example, https://b.example")
    assert (cfg.frontend_http, cfg.api_keys_file, cfg.keys_poll_seconds) == ("127.0.0.1:8001", "/run/keys", 0.5)
    assert cfg.cors_origins == ("https://a.example", "https://b.example") and cfg.auth is False
    cfg = config(consul="http://127.0.0.1:8500", api_keys=f"{KEY_A}:acme")
    assert (cfg.frontend, cfg.auth, cfg.listen_port) == ("consul:frontend", True, 8080)


@pytest.mark.parametrize(("values", "names"), [
    ({"auth": "false"}, "LLMFABRIC_XDS_CONSUL"),  # default FRONTEND=consul:frontend
    ({"frontend": "127.0.0.1:9000", "auth": "false"}, "LLMFABRIC_XDS_FRONTEND_HTTP"),
    ({"frontend": "h:1", "frontend_http": "h:2"}, "LLMFABRIC_XDS_AUTH"),
    ({**STATIC, "tenant_rate_limits": "acme"}, "LLMFABRIC_XDS_TENANT_RATE_LIMITS"),
    ({**STATIC, "tenant_rate_limits": "acme=fast"}, "LLMFABRIC_XDS_TENANT_RATE_LIMITS"),
    ({**STATIC, "listen_port": "70000"}, "LLMFABRIC_XDS_LISTEN_PORT"),
    ({**STATIC, "listen_port": "http"}, "LLMFABRIC_XDS_LISTEN_PORT"),
    ({**STATIC, "max_request_bytes": "512"}, "LLMFABRIC_XDS_MAX_REQUEST_BYTES"),
])
def test_config_errors_name_the_variable(values, names):
    with pytest.raises(ConfigError, match=names):
        config(**values)


@pytest.mark.parametrize(("values", "names"), [
    ({"rate_limit_rps": "100"}, "RATE_LIMIT"),  # burst defaults to 40 < rps
    ({"tenant_rate_limits": "acme=1,acme=2"}, "TENANT_RATE_LIMITS"),
    ({"max_request_bytes": str(2 << 30)}, "MAX_REQUEST_BYTES"),
    ({"stream_idle_timeout_s": "-1"}, "STREAM_IDLE_TIMEOUT_S"),
])
def test_values_the_policy_rejects_are_config_errors(values, names):
    with pytest.raises(ConfigError, match=names):
        config(**STATIC, **values)


# ----------------------------------------------------------------- snapshot
async def test_static_snapshot_auth_off_and_rate_limit_off(start):
    plane, _ = await start(**STATIC, rate_limit_rps="0", tenant_rate_limits="acme=5:10")
    snap = plane.ads.current
    assert list(snap.resources(LISTENER)) == ["edge"]
    assert sorted(snap.resources(CLUSTER)) == sorted(snap.resources(ENDPOINT)) == ["frontend_grpc", "frontend_http"]
    assert endpoints(plane, "frontend_grpc") == [("127.0.0.1", 9000), ("127.0.0.1", 9001)]
    assert endpoints(plane, "frontend_http") == [("127.0.0.1", 8001)]
    assert "api_key_auth" not in filters(plane) and "local_ratelimit" not in filters(plane)
    assert plane.publishes == 1


async def test_static_snapshot_auth_on_with_tenant_overrides(start):
    plane, _ = await start(**{**STATIC, "auth": "true"}, api_keys=f"{KEY_A}:acme,{KEY_B}:beta",
                           rate_limit_rps="20", rate_limit_burst="40", tenant_rate_limits="acme=5:10")
    assert tenants(plane) == ["acme", "beta"]
    rl = filters(plane)["local_ratelimit"]
    assert rl["token_bucket"]["max_tokens"] == 40
    buckets = {d["entries"][0]["value"]: d["token_bucket"]["max_tokens"] for d in rl["descriptors"]}
    assert buckets == {"acme": 10, "beta": 40}


# ----------------------------------------------------------------- ADS over gRPC, health, metrics
async def test_ads_client_health_and_metrics(start):
    plane, port = await start(**STATIC)
    node = base_pb2.Node(id="edge-test", cluster="edge")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert (await check(health_pb2.HealthCheckRequest(), timeout=5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await plane.host.set_serving(True)  # what serve_until_signalled does once load() returned
        for service in ("", ADS_SERVICE):
            reply = await check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()

        async def ask(type_url: str, names=(), **extra) -> discovery_pb2.DiscoveryResponse | None:
            await call.write(discovery_pb2.DiscoveryRequest(node=node, type_url=type_url, resource_names=names, **extra))
            if "response_nonce" in extra:
                return None
            resp = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert resp.type_url == type_url
            return resp

        cds = await ask(CLUSTER)
        names = [cluster_pb2.Cluster.FromString(a.value).name for a in cds.resources]
        assert names == ["frontend_grpc", "frontend_http"] and cds.version_info == plane.ads.current.version(CLUSTER)
        eds = await ask(ENDPOINT, names)
        assert [endpoint_pb2.ClusterLoadAssignment.FromString(a.value).cluster_name for a in eds.resources] == names
        await ask(CLUSTER, version_info=cds.version_info, response_nonce=cds.nonce)  # ACK
        lds = await ask(LISTENER)
        assert listener_pb2.Listener.FromString(lds.resources[0].value).name == "edge"
        assert len(lds.resources) == 1 and lds.version_info == plane.ads.current.version(LISTENER)
        await ask(LISTENER, response_nonce=lds.nonce, error_detail={"message": "rejected"})  # NACK

        want = {"llmfabric_xds_streams": 1, "llmfabric_xds_responses_total": 3, "llmfabric_xds_acks_total": 1,
                "llmfabric_xds_nacks_total": 1, "llmfabric_xds_publishes_total": 1, "llmfabric_xds_frontends": 2}
        await eventually(lambda: {k: metrics(plane).get(k) for k in want} == want, WAIT, "xds metrics")
        call.cancel()


class _Context:
    """Just enough of a grpc.aio ServicerContext for AdsServer.StreamAggregatedResources."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def write(self, response) -> None:
        return None


async def test_a_stream_cancelled_while_it_closes_is_forgotten(start):
    plane, _ = await start(**STATIC)

    async def half_closed():  # the client half-closes at once (done_writing), then resets the stream
        return
        yield

    for spins in range(8):  # cancel at each point of the handler's life, the finally included
        task = asyncio.create_task(plane.ads.StreamAggregatedResources(half_closed(), _Context()))
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert metrics(plane)["llmfabric_xds_streams"] == 0


# ----------------------------------------------------------------- API key file rotation
async def test_key_file_edits(start, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llmfabric.gateway.controlplane.server")
    path = tmp_path / "api-keys"
    path.write_text(f"# keys\n{KEY_A}:acme\n")
    path.chmod(0o600)
    plane, _ = await start(**{**STATIC, "auth": "true"}, api_keys_file=str(path), keys_poll_seconds="0.05")
    assert tenants(plane) == ["acme"] and plane.publishes == 1
    version = plane.ads.current.version(LISTENER)

    path.write_text(f"# keys\n{KEY_A}:acme\n{KEY_B}:beta\n")  # a new tenant
    await eventually(lambda: plane.publishes == 2, WAIT, "new key published")
    assert tenants(plane) == ["acme", "beta"] and plane.ads.current.version(LISTENER) != version
    version = plane.ads.current.version(LISTENER)

    def rejected() -> int:
        return sum(r.levelno == logging.ERROR and "API key file rejected" in r.getMessage() for r in caplog.records)

    for n, broken in enumerate([f"{KEY_A}:acme\nshort:evil\n", "# every key removed\n"], 1):
        path.write_text(broken)  # a too-short key; then no key at all while auth is on
        await eventually(lambda n=n: rejected() == n, WAIT, "broken edit rejected")
        assert tenants(plane) == ["acme", "beta"] and plane.ads.current.version(LISTENER) == version
        assert plane.publishes == 2

    good = f"{KEY_A}:acme\n{KEY_B}:beta\n"
    path.write_text(good)  # back to the published keys: nothing new to publish
    await eventually(lambda: plane._keys_stamp == plane._stamp(), WAIT, "fixed file read")
    path.write_text(good)  # the same content again, with a newer mtime so the poller surely re-reads it
    stamp = os.stat(path).st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))
    await eventually(lambda: plane._keys_stamp == plane._stamp(), WAIT, "rewrite seen")
    assert plane.publishes == 2 and rejected() == 2 and plane.ads.current.version(LISTENER) == version


# ----------------------------------------------------------------- Consul catalog
class HealthServer:
    """A frontend stand-in: only grpc.health.v1, SERVING (what Consul's check calls)."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")


async def test_consul_catalog_changes(start):
    agent = ConsulAgent()
    await agent.start()
    frontends = [HealthServer(), HealthServer()]
    regs: list[Registration] = []
    try:
        for f in frontends:
            await f.health.set("", health_pb2.HealthCheckResponse.SERVING)
            await f.server.start()
        plane, _ = await start(consul=agent.url, auth="false")
        assert endpoints(plane, "frontend_grpc") == endpoints(plane, "frontend_http") == []
        heard = []
        plane.catalog.subscribe(heard.append)  # called after the plane's own callback

        def both(grpc_eps, http_eps):
            return lambda: (endpoints(plane, "frontend_grpc"), endpoints(plane, "frontend_http")) == (grpc_eps, http_eps)

        a, b = (("127.0.0.1", f.port) for f in frontends)
        regs.append(Registration(agent.url, "frontend", *a, meta={"http_port": "8123"}, resync_seconds=3600))
        await regs[-1].start()
        await eventually(both([a], [("127.0.0.1", 8123)]), WAIT, "instance with http_port in both clusters")
        regs.append(Registration(agent.url, "frontend", *b, resync_seconds=3600))  # no http_port: gRPC only
        await regs[-1].start()
        await eventually(both(sorted([a, b]), [("127.0.0.1", 8123)]), WAIT, "instance without http_port")
        assert metrics(plane)["llmfabric_xds_frontends"] == 2

        # A change Consul reports that the snapshot does not show (a new tag): nothing published.
        publishes, seen = plane.publishes, len(heard)
        regs.append(Registration(agent.url, "frontend", *a, meta={"http_port": "8123"}, tags=("v2",),
                                 resync_seconds=3600))
        await regs[-1].start()
        await eventually(lambda: len(heard) > seen, WAIT, "tag change heard")
        assert plane.catalog.backends == heard[-1] and plane.publishes == publishes

        await regs[0].stop()  # deregisters instance a (the v2 registration shares its id)
        await eventually(both([b], []), WAIT, "deregistered instance removed")
        assert plane.publishes == publishes + 1
    finally:
        for r in regs:
            await r.stop()
        for f in frontends:
            await f.server.stop(None)
        await agent.stop()

"""The ADS server (gateway/xds) against the real Envoy.

One Envoy, bootstrapped with only a static ``xds`` cluster pointing at our
AdsServer, gets everything else over ADS: a listener whose HTTP connection manager
takes its routes over RDS, a route to the EDS cluster ``backend``, and that
cluster's endpoints, which point at one of two tiny aiohttp servers. Ports are
chosen at run time; everything started here is stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from llmfabric.cli.processes import free_port
from llmfabric.gateway.xds import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    AdsServer,
    Snapshot,
)

pytestmark = pytest.mark.integration

ENVOY = pathlib.Path(sys.executable).parent / "envoy"
NODE_ID = "edge-xds-test"
DEADLINE = (
    90.0  # generous: a noisy 2-core machine; every wait polls, none sleeps blindly
)
HOST = "127.0.0.1"


# --- resources -----------------------------------------------------------------------


def ads_source() -> config_source_pb2.ConfigSource:
    src = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    src.ads.SetInParent()
    return src


def backend_cluster(**fields) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name="backend", type=cluster_pb2.Cluster.EDS, **fields)
    if not c.HasField("connect_timeout"):
        c.connect_timeout.seconds = 2
    c.eds_cluster_config.eds_config.CopyFrom(ads_source())
    return c


def backend_endpoints(port: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name="backend")
    sock = cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sock.address, sock.port_value = HOST, port
    return cla


def edge_listener(port: int, stat_prefix: str = "ingress") -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix)
    hcm.rds.route_config_name = "edge-routes"
    hcm.rds.config_source.CopyFrom(ads_source())
    router = hcm.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    lis = listener_pb2.Listener(name="edge")
    lis.address.socket_address.address, lis.address.socket_address.port_value = (
        HOST,
        port,
    )
    f = lis.filter_chains.add().filters.add(
        name="envoy.filters.network.http_connection_manager"
    )
    f.typed_config.Pack(hcm)
    return lis


def edge_routes() -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name="edge-routes")
    r = rc.virtual_hosts.add(name="all", domains=["*"]).routes.add()
    r.match.prefix = "/"
    r.route.cluster = "backend"
    return rc


def snapshot(
    listen_port: int, backend_port: int, cluster=None, listener=None
) -> Snapshot:
    return Snapshot.from_resources(
        clusters=[cluster or backend_cluster()],
        endpoints=[backend_endpoints(backend_port)],
        listeners=[listener or edge_listener(listen_port)],
        routes=[edge_routes()],
    )


def bootstrap(admin_port: int, xds_port: int) -> dict:
    ads = {"ads": {}, "resource_api_version": "V3"}
    xds = {"socket_address": {"address": HOST, "port_value": xds_port}}
    h2_key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    h2_options = {
        "@type": f"type.googleapis.com/{h2_key}",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    return {
        "node": {"id": NODE_ID, "cluster": "llmfabric-edge"},
        "admin": {
            "address": {"socket_address": {"address": HOST, "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {h2_key: h2_options},
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": xds}}]}
                        ],
                    },
                }
            ]
        },
    }


# --- the environment -------------------------------------------------------------------


async def eventually(
    check, what: str, timeout: float = DEADLINE, interval: float = 0.05
):
    """Poll ``check`` (async) until it returns a truthy value, which is returned."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            value = await check()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            value, last = None, exc
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(
        f"{what}: not reached within {timeout}s (last error: {last!r})"
    )


async def start_backend(label: str) -> tuple[web.AppRunner, int]:
    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text=label)

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    return runner, runner.addresses[0][1]


class Edge:
    """Envoy + our ADS server + two backends, and helpers to look at them."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.listen_port, self.admin_port = free_port(), free_port()
        self.xds = AdsServer()
        self.grpc: grpc.aio.Server | None = None
        self.envoy: subprocess.Popen | None = None
        self.runners: list[web.AppRunner] = []
        self.backends: dict[str, int] = {}
        self.http: aiohttp.ClientSession | None = None
        self.log_path = tmp / "envoy.log"

    async def start_ads(self, port: int = 0) -> int:
        self.grpc = grpc.aio.server()
        self.xds.add_to_server(self.grpc)
        self.xds_port = self.grpc.add_insecure_port(f"{HOST}:{port}")
        await self.grpc.start()
        return self.xds_port

    async def start(self) -> None:
        for label in ("backend-1", "backend-2"):
            runner, port = await start_backend(label)
            self.runners.append(runner)
            self.backends[label] = port
        # a new connection per request: no keep-alive pinning to a draining filter chain
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10),
            connector=aiohttp.TCPConnector(force_close=True),
        )
        await self.start_ads()
        self.xds.publish(snapshot(self.listen_port, self.backends["backend-1"]))
        path = self.tmp / "bootstrap.json"
        path.write_text(json.dumps(bootstrap(self.admin_port, self.xds_port)))
        argv = [
            str(ENVOY),
            "-c",
            str(path),
            "--base-id",
            str(random.randint(1000, 60000)),
        ]
        argv += ["--disable-hot-restart", "--log-level", "info"]
        self.envoy = await asyncio.to_thread(self._spawn, argv)

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        with open(self.log_path, "wb") as log:
            return subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def stop(self) -> None:
        if self.envoy is not None and self.envoy.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.envoy.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.envoy.wait, 20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.envoy.pid, signal.SIGKILL)
                await asyncio.to_thread(self.envoy.wait, 20)
        if self.grpc is not None:
            await self.grpc.stop(None)
        if self.http is not None:
            await self.http.close()
        for runner in self.runners:
            await runner.cleanup()

    def envoy_log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    async def get(self) -> str | None:
        """One request through Envoy: the backend's label, or None if not served."""
        assert self.envoy.poll() is None, f"envoy exited:\n{self.envoy_log()}"
        url = f"http://{HOST}:{self.listen_port}/hello"
        async with self.http.get(url) as resp:
            return (await resp.text()) if resp.status == 200 else None

    async def admin(self, path: str) -> str:
        async with self.http.get(f"http://{HOST}:{self.admin_port}{path}") as resp:
            assert resp.status == 200, (path, resp.status)
            return await resp.text()

    async def active_cluster(self) -> dict | None:
        dump = json.loads(
            await self.admin("/config_dump?resource=dynamic_active_clusters")
        )
        for entry in dump.get("configs", []):
            if entry.get("cluster", {}).get("name") == "backend":
                return entry
        return None

    async def stat(self, name: str) -> int | str | None:
        text = await self.admin(f"/stats?filter=^{re.escape(name)}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return value.strip('"') if value.startswith('"') else int(value)
        return None

    async def serves(self, label: str) -> bool:
        return await self.get() == label

    async def publish(self, snap: Snapshot) -> None:
        """Publish and wait until Envoy ACKed every type's new version."""
        self.xds.publish(snap)
        for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            version = snap.version(type_url)
            await self.xds.wait_acked(type_url, version, DEADLINE, node_id=NODE_ID)


@pytest.fixture(scope="module")
async def xds_edge(tmp_path_factory):
    if not os.access(ENVOY, os.X_OK):
        pytest.skip(f"no envoy binary at {ENVOY}")
    env = Edge(tmp_path_factory.mktemp("xds-envoy"))
    try:
        await env.start()
        for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            version = env.xds.current.version(type_url)
            await env.xds.wait_acked(type_url, version, DEADLINE, node_id=NODE_ID)
        await eventually(lambda: env.serves("backend-1"), "first request through Envoy")
        yield env
    except BaseException:
        print(f"--- envoy log ---\n{env.envoy_log()}")
        raise
    finally:
        await env.stop()


# --- the tests -------------------------------------------------------------------------


async def test_traffic_flows_through_envoy(xds_edge: Edge):
    assert await xds_edge.get() == "backend-1"
    status = {s.node_id: s for s in xds_edge.xds.streams()}[NODE_ID]
    assert status.node_cluster == "llmfabric-edge"
    assert status.types[ENDPOINT].resource_names == ("backend",)
    assert status.types[ROUTE].resource_names == ("edge-routes",)
    assert status.types[CLUSTER].wildcard and status.types[LISTENER].wildcard
    assert await xds_edge.stat("control_plane.connected_state") == 1


async def test_config_dump_shows_our_version(xds_edge: Edge):
    entry = await eventually(
        xds_edge.active_cluster, "backend in dynamic_active_clusters"
    )
    assert entry["version_info"] == xds_edge.xds.current.version(CLUSTER)
    assert entry["cluster"]["type"] == "EDS"
    listeners = json.loads(
        await xds_edge.admin("/config_dump?resource=dynamic_listeners")
    )
    [lis] = [c for c in listeners["configs"] if c.get("name") == "edge"]
    assert lis["active_state"]["version_info"] == xds_edge.xds.current.version(LISTENER)


async def test_endpoint_switch_moves_traffic(xds_edge: Edge):
    await xds_edge.publish(
        snapshot(xds_edge.listen_port, xds_edge.backends["backend-1"])
    )
    await eventually(lambda: xds_edge.serves("backend-1"), "traffic on backend-1")
    started = time.monotonic()
    new = snapshot(xds_edge.listen_port, xds_edge.backends["backend-2"])
    assert new.version(ENDPOINT) != xds_edge.xds.current.version(ENDPOINT)
    assert new.version(CLUSTER) == xds_edge.xds.current.version(CLUSTER)
    xds_edge.xds.publish(new)
    await eventually(
        lambda: xds_edge.serves("backend-2"), "traffic on backend-2", interval=0.005
    )
    elapsed = time.monotonic() - started
    print(
        f"\nEDS propagation (publish -> first request on the new backend): {elapsed * 1000:.1f} ms"
    )
    await xds_edge.xds.wait_acked(
        ENDPOINT, new.version(ENDPOINT), DEADLINE, node_id=NODE_ID
    )
    for _ in range(5):
        assert await xds_edge.get() == "backend-2"


async def test_nacked_config_keeps_old_config(xds_edge: Edge):
    good = snapshot(xds_edge.listen_port, xds_edge.backends["backend-2"])
    await xds_edge.publish(good)
    nacks_before = xds_edge.xds.stats()["nacks"]
    # Envoy rejects this cluster (CLUSTER_PROVIDED needs a cluster type that provides
    # its own load balancer); it parses fine, so only Envoy can tell.
    bad_cluster = backend_cluster(lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    bad = snapshot(
        xds_edge.listen_port, xds_edge.backends["backend-2"], cluster=bad_cluster
    )
    assert bad.version(CLUSTER) != good.version(CLUSTER)
    xds_edge.xds.publish(bad)

    def nacked() -> bool:
        node = xds_edge.xds.stats()["nodes"].get(NODE_ID, {})
        return node.get("nacked", {}).get(CLUSTER, {}).get("version") == bad.version(
            CLUSTER
        )

    await xds_edge.xds.wait_until(nacked, DEADLINE)
    node = xds_edge.xds.stats()["nodes"][NODE_ID]
    error = node["nacked"][CLUSTER]["error"]
    print(f"\nEnvoy's NACK of the invalid cluster: {error}")
    assert node["acked"][CLUSTER] == good.version(CLUSTER)
    # still on the old config: traffic flows, the active cluster keeps its version
    for _ in range(5):
        assert await xds_edge.get() == "backend-2"
    entry = await xds_edge.active_cluster()
    assert entry["version_info"] == good.version(CLUSTER)
    assert await xds_edge.stat("cluster_manager.cds.update_rejected") >= 1
    # the rejected version is not sent again (not even when it is re-published)
    xds_edge.xds.publish(bad)
    await asyncio.sleep(1.0)
    assert xds_edge.xds.stats()["nacks"] == nacks_before + 1
    # a valid, modified cluster is accepted and finishes warming (EDS after CDS)
    fixed_cluster = backend_cluster()
    fixed_cluster.connect_timeout.seconds = 3
    fixed = snapshot(
        xds_edge.listen_port, xds_edge.backends["backend-2"], cluster=fixed_cluster
    )
    started = time.monotonic()
    await xds_edge.publish(fixed)

    async def fixed_active():
        entry = await xds_edge.active_cluster()
        return entry and entry["version_info"] == fixed.version(CLUSTER)

    await eventually(fixed_active, "modified cluster active (not stuck warming)")
    print(
        f"modified cluster warm (publish -> active): {time.monotonic() - started:.3f} s"
    )
    await eventually(lambda: xds_edge.serves("backend-2"), "traffic after the fix")


async def test_listener_update_takes_effect(xds_edge: Edge):
    """An updated listener needs no RDS push: Envoy reuses the routes it has."""
    lis = edge_listener(xds_edge.listen_port, stat_prefix="ingress_v2")
    new = snapshot(xds_edge.listen_port, xds_edge.backends["backend-2"], listener=lis)
    assert new.version(ROUTE) == xds_edge.xds.current.version(ROUTE)
    started = time.monotonic()
    await xds_edge.publish(new)

    async def active():
        dump = json.loads(
            await xds_edge.admin("/config_dump?resource=dynamic_listeners")
        )
        [entry] = [c for c in dump["configs"] if c.get("name") == "edge"]
        state = entry.get("active_state", {})
        hcm = state.get("listener", {})["filter_chains"][0]["filters"][0][
            "typed_config"
        ]
        return hcm["stat_prefix"] == "ingress_v2" and state

    state = await eventually(active, "updated listener active")
    print(f"\nupdated listener active after {time.monotonic() - started:.3f} s")
    # An in-place (filter-chain only) update leaves config_dump's version_info alone.
    print(
        f"active listener version_info {state['version_info']}, published {new.version(LISTENER)}"
    )
    assert await xds_edge.stat("listener_manager.lds.version_text") == new.version(
        LISTENER
    )
    await eventually(
        lambda: xds_edge.serves("backend-2"), "traffic on the updated listener"
    )
    await eventually(
        lambda: xds_edge.stat("http.ingress_v2.downstream_rq_total"), "new chain used"
    )


async def test_envoy_keeps_serving_without_ads(xds_edge: Edge):
    await eventually(lambda: xds_edge.serves("backend-2"), "traffic on backend-2")
    versions = {
        t: xds_edge.xds.current.version(t) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
    }
    await xds_edge.grpc.stop(None)
    xds_edge.grpc = None

    async def disconnected():
        return await xds_edge.stat("control_plane.connected_state") == 0

    await eventually(disconnected, "Envoy sees the ADS server gone")
    for _ in range(10):
        assert await xds_edge.get() == "backend-2"
    entry = await xds_edge.active_cluster()
    assert entry["version_info"] == versions[CLUSTER]
    # back on the same port: Envoy reconnects, its first requests report the versions
    # it holds; it gets the (unchanged) state again and ACKs every type
    acks = xds_edge.xds.stats()["acks"]
    started = time.monotonic()
    await xds_edge.start_ads(xds_edge.xds_port)
    await xds_edge.xds.wait_until(
        lambda: xds_edge.xds.stats()["acks"] >= acks + 4, DEADLINE
    )
    print(
        f"\nADS restart -> Envoy re-synced and ACKed: {time.monotonic() - started:.3f} s"
    )
    for type_url, version in versions.items():
        await xds_edge.xds.wait_acked(type_url, version, DEADLINE, node_id=NODE_ID)
    assert await xds_edge.get() == "backend-2"

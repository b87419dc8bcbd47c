"""The ADS server (gateway/xds) driven by a grpc.aio client that plays Envoy.

"Nothing was sent" is checked without timing: after the action, the fake Envoy
subscribes to a fresh route name (a probe the server must answer); responses on a
stream go out in order, so the next message read must be the probe's answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from llmfabric.gateway.xds import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    AdsServer,
    Snapshot,
    resource_name,
)

READ_TIMEOUT = 20.0  # bound on one read: a missing response fails, never hangs


def cluster(name: str, timeout_s: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.seconds = timeout_s
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def cla(name: str, port: int = 8000) -> endpoint_pb2.ClusterLoadAssignment:
    a = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    ep = a.endpoints.add().lb_endpoints.add().endpoint
    ep.address.socket_address.address = "127.0.0.1"
    ep.address.socket_address.port_value = port
    return a


def listener(name: str, route: str) -> listener_pb2.Listener:
    lis = listener_pb2.Listener(name=name)
    lis.address.socket_address.address = "127.0.0.1"
    lis.address.socket_address.port_value = 10000
    lis.stat_prefix = route
    return lis


def route(name: str, target: str) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vh = rc.virtual_hosts.add(name="all", domains=["*"])
    r = vh.routes.add()
    r.match.prefix = "/"
    r.route.cluster = target
    return rc


def snap(clusters=("a", "b"), endpoints=None, port=8000, **kw) -> Snapshot:
    endpoints = clusters if endpoints is None else endpoints
    return Snapshot.from_resources(
        clusters=[cluster(c) for c in clusters],
        endpoints=[cla(e, port) for e in endpoints],
        **kw,
    )


_MESSAGES = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
}


def names(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    """The names of the resources in a response, in order."""
    out = []
    for any_ in resp.resources:
        msg = _MESSAGES[resp.type_url]()
        assert any_.Unpack(msg)
        out.append(resource_name(msg))
    return out


class FakeEnvoy:
    """One ADS stream, speaking like Envoy (node only on the first message)."""

    _probes = itertools.count()

    def __init__(self, target: str, node_id: str) -> None:
        self.node_id = node_id
        self.channel = grpc.aio.insecure_channel(target)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.StreamAggregatedResources()
        self.first = True
        self.last: dict[str, discovery_pb2.DiscoveryResponse] = {}

    async def request(
        self, type_url, names=(), version="", nonce="", error=None
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
        )
        if self.first:
            req.node.id, req.node.cluster, self.first = self.node_id, "edge", False
        if error is not None:
            req.error_detail.code = 3
            req.error_detail.message = error
        await self.call.write(req)

    async def recv(self) -> discovery_pb2.DiscoveryResponse:
        resp = await asyncio.wait_for(self.call.read(), READ_TIMEOUT)
        assert resp is not grpc.aio.EOF, "stream ended"
        self.last[resp.type_url] = resp
        return resp

    async def ack(self, resp, names=()) -> None:
        await self.request(resp.type_url, names, resp.version_info, resp.nonce)

    async def nack(self, resp, keep_version: str, error: str, names=()) -> None:
        await self.request(resp.type_url, names, keep_version, resp.nonce, error=error)

    async def assert_quiet(self) -> None:
        """Nothing is queued for us: a probe request's answer is the next message."""
        probe = f"probe-{next(self._probes)}"
        prev = self.last.get(ROUTE)
        await self.request(
            ROUTE,
            [probe],
            prev.version_info if prev else "",
            prev.nonce if prev else "",
        )
        resp = await self.recv()
        assert resp.type_url == ROUTE, f"unexpected {resp.type_url} {resp.version_info}"
        await self.ack(resp, [probe])

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


@pytest.fixture
async def ads():
    server = grpc.aio.server()
    xds = AdsServer(snap())
    xds.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    clients: list[FakeEnvoy] = []

    def connect(node_id: str = "envoy-1") -> FakeEnvoy:
        c = FakeEnvoy(f"127.0.0.1:{port}", node_id)
        clients.append(c)
        return c

    yield xds, connect
    for c in clients:
        await c.close()
    await server.stop(None)


async def cds_acked(
    xds: AdsServer, envoy: FakeEnvoy
) -> discovery_pb2.DiscoveryResponse:
    await envoy.request(CLUSTER)
    resp = await envoy.recv()
    await envoy.ack(resp)
    await xds.wait_acked(CLUSTER, resp.version_info, node_id=envoy.node_id)
    return resp


# --- Snapshot ------------------------------------------------------------------------


def test_version_is_content_based():
    one = Snapshot({CLUSTER: {"a": cluster("a"), "b": cluster("b")}})
    two = Snapshot({CLUSTER: [cluster("b"), cluster("a")]})
    assert one.version(CLUSTER) == two.version(CLUSTER)
    assert one == two and hash(one) == hash(two)
    assert Snapshot({CLUSTER: [cluster("a"), cluster("b", 2)]}).version(
        CLUSTER
    ) != one.version(CLUSTER)
    assert Snapshot({CLUSTER: [cluster("a")]}).version(CLUSTER) != one.version(CLUSTER)
    # an absent type is served as empty; other types do not affect a type's version
    assert Snapshot().version(ENDPOINT) == Snapshot({ENDPOINT: []}).version(ENDPOINT)
    assert Snapshot() == Snapshot({ENDPOINT: []})
    assert snap().version(CLUSTER) == snap(endpoints=["a"]).version(CLUSTER)


def test_snapshot_is_immutable_and_checked():
    c = cluster("a")
    s = Snapshot({CLUSTER: [c]})
    before = s.version(CLUSTER)
    c.connect_timeout.seconds = 9
    assert s.version(CLUSTER) == before and s[CLUSTER]["a"].connect_timeout.seconds == 1
    with pytest.raises(TypeError):
        s[CLUSTER]["b"] = cluster("b")
    with pytest.raises(ValueError, match="named"):
        Snapshot({CLUSTER: {"x": cluster("a")}})
    with pytest.raises(TypeError):
        Snapshot({CLUSTER: [cla("a")]})
    with pytest.raises(ValueError, match="duplicate"):
        Snapshot({CLUSTER: [cluster("a"), cluster("a")]})
    assert [a.type_url for a in s.packed(CLUSTER)] == [CLUSTER]
    assert s.packed(CLUSTER, ["zz"]) == [] and s.packed(LISTENER) == []


# --- protocol ------------------------------------------------------------------------


async def test_initial_cds_ack_then_silence(ads):
    xds, connect = ads
    envoy = connect()
    await envoy.request(CLUSTER)
    resp = await envoy.recv()
    assert resp.version_info == xds.current.version(CLUSTER) and resp.nonce
    assert names(resp) == ["a", "b"]
    sent = xds.stats()["responses"]
    await envoy.ack(resp)
    await xds.wait_acked(CLUSTER, resp.version_info)
    assert xds.stats()["responses"] == sent
    assert xds.stats()["nodes"]["envoy-1"]["acked"][CLUSTER] == resp.version_info
    await envoy.assert_quiet()
    [status] = xds.streams()
    assert status.node_id == "envoy-1" and status.node_cluster == "edge"
    assert (
        status.types[CLUSTER].wildcard
        and status.types[CLUSTER].acked_version == resp.version_info
    )


async def test_identical_publish_sends_nothing(ads):
    xds, connect = ads
    envoy = connect()
    await cds_acked(xds, envoy)
    sent = xds.stats()["responses"]
    xds.publish(snap())  # a new object with the same content
    assert xds.stats()["responses"] == sent
    await envoy.assert_quiet()
    assert xds.stats()["responses"] == sent + 1  # the probe's answer only


async def test_changed_cluster_set_pushes_new_version(ads):
    xds, connect = ads
    envoy = connect()
    first = await cds_acked(xds, envoy)
    xds.publish(snap(clusters=("a", "b", "c")))
    resp = await envoy.recv()
    assert resp.type_url == CLUSTER and names(resp) == ["a", "b", "c"]
    assert resp.version_info == xds.current.version(CLUSTER) != first.version_info
    assert resp.nonce != first.nonce
    await envoy.ack(resp)
    await xds.wait_acked(CLUSTER, resp.version_info)
    await envoy.assert_quiet()


async def test_nack_keeps_old_version_and_is_not_resent(ads, caplog):
    xds, connect = ads
    envoy = connect("envoy-nack")
    good = await cds_acked(xds, envoy)
    caplog.set_level(logging.WARNING, logger="llmfabric.gateway.xds")
    xds.publish(snap(clusters=("a", "bad")))
    bad = await envoy.recv()
    await envoy.nack(bad, good.version_info, "Proto constraint validation failed")
    await xds.wait_until(lambda: xds.stats()["nacks"] == 1, READ_TIMEOUT)
    node = xds.stats()["nodes"]["envoy-nack"]
    assert node["acked"][CLUSTER] == good.version_info
    assert node["nacked"][CLUSTER]["version"] == bad.version_info
    assert "Proto constraint" in node["nacked"][CLUSTER]["error"]
    [record] = [r for r in caplog.records if "NACK" in r.getMessage()]
    assert record.levelno == logging.WARNING
    for part in (
        "envoy-nack",
        "Cluster",
        bad.version_info,
        "Proto constraint validation failed",
    ):
        assert part in record.getMessage()
    # not resent: neither on its own nor when the same content is published again
    await envoy.assert_quiet()
    xds.publish(snap(clusters=("a", "bad")))
    await envoy.assert_quiet()
    # new content goes out
    xds.publish(snap(clusters=("a", "fixed")))
    fixed = await envoy.recv()
    assert names(fixed) == ["a", "fixed"]
    await envoy.ack(fixed)
    await xds.wait_acked(CLUSTER, fixed.version_info)


async def test_stale_nonce_is_ignored(ads):
    xds, connect = ads
    envoy = connect()
    await envoy.request(CLUSTER)
    r1 = await envoy.recv()
    xds.publish(snap(clusters=("a",)))
    r2 = await envoy.recv()
    # a late ACK and a late NACK of r1: both stale once r2 was sent
    await envoy.ack(r1)
    await envoy.nack(r1, "", "late")
    await xds.wait_until(lambda: xds.stats()["stale"] == 2, READ_TIMEOUT)
    stats = xds.stats()
    assert (
        stats["acks"] == stats["nacks"] == 0 and not stats["nodes"]["envoy-1"]["acked"]
    )
    await envoy.ack(r2)
    await xds.wait_acked(CLUSTER, r2.version_info)
    await envoy.assert_quiet()


async def test_eds_returns_requested_names_and_follows_changes(ads):
    xds, connect = ads
    xds.publish(snap(clusters=("a", "b", "c")))
    envoy = connect()
    await envoy.request(ENDPOINT, ["c", "a"])
    r1 = await envoy.recv()
    assert r1.type_url == ENDPOINT and names(r1) == ["a", "c"]
    # the ACK also changes the names: same version, new response with the new names
    await envoy.ack(r1, ["a", "b", "missing"])
    r2 = await envoy.recv()
    assert names(r2) == ["a", "b"] and r2.version_info == r1.version_info
    await envoy.ack(r2, ["a", "b", "missing"])
    await xds.wait_acked(ENDPOINT, r2.version_info)
    await envoy.assert_quiet()
    # the missing one springs into existence: pushed
    xds.publish(snap(clusters=("a", "b", "c", "missing")))
    r3 = await envoy.recv()
    assert names(r3) == ["a", "b", "missing"] and r3.version_info != r2.version_info
    await envoy.ack(r3, ["a", "b", "missing"])
    # a change only in resources it did not subscribe to still gets the new version
    await xds.wait_acked(ENDPOINT, r3.version_info)
    # unsubscribing from everything: nothing to send
    await envoy.ack(r3, [])
    await envoy.assert_quiet()


async def test_cds_wildcard_and_explicit_names(ads):
    xds, connect = ads
    envoy = connect()
    await envoy.request(CLUSTER, ["b"])  # an explicit subscription, not a wildcard
    r1 = await envoy.recv()
    assert names(r1) == ["b"]
    await envoy.ack(r1, ["*"])  # explicit wildcard
    r2 = await envoy.recv()
    assert names(r2) == ["a", "b"] and r2.version_info == r1.version_info
    await envoy.ack(r2, [])  # after explicit names, an empty list unsubscribes
    await envoy.assert_quiet()
    xds.publish(snap(clusters=("a", "b", "c")))
    await envoy.assert_quiet()
    [status] = xds.streams()
    assert (
        not status.types[CLUSTER].wildcard
        and status.types[CLUSTER].resource_names == ()
    )


async def test_publish_pushes_in_make_before_break_order(ads):
    xds, connect = ads
    xds.publish(snap(listeners=[listener("l", "r")], routes=[route("r", "a")]))
    envoy = connect()
    subs = {CLUSTER: [], ENDPOINT: ["a", "b"], LISTENER: [], ROUTE: ["r"]}
    for type_url, wanted in subs.items():
        await envoy.request(type_url, wanted)
        await envoy.recv()
    for type_url, wanted in subs.items():
        await envoy.ack(envoy.last[type_url], wanted)
    await xds.wait_until(lambda: xds.stats()["acks"] == 4, READ_TIMEOUT)
    # one publish that changes every type: pushed CDS, EDS, LDS, RDS, in that order
    xds.publish(
        Snapshot.from_resources(
            clusters=[cluster("a", 2), cluster("b")],
            endpoints=[cla("a", 9001), cla("b", 9001)],
            listeners=[listener("l", "r3")],
            routes=[route("r", "b")],
        )
    )
    order = [(await envoy.recv()).type_url for _ in range(4)]
    assert order == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    for type_url, wanted in subs.items():
        await envoy.ack(envoy.last[type_url], wanted)
    await envoy.assert_quiet()


async def test_cds_push_is_followed_by_eds(ads):
    xds, connect = ads
    envoy = connect()
    await cds_acked(xds, envoy)
    await envoy.request(ENDPOINT, ["a", "b"])
    eds = await envoy.recv()
    await envoy.ack(eds, ["a", "b"])
    await xds.wait_acked(ENDPOINT, eds.version_info)
    xds.publish(
        Snapshot.from_resources(
            clusters=[cluster("a", 5), cluster("b")], endpoints=[cla("a"), cla("b")]
        )
    )
    cds = await envoy.recv()
    again = await envoy.recv()
    assert cds.type_url == CLUSTER and again.type_url == ENDPOINT
    assert again.version_info == eds.version_info and names(again) == ["a", "b"]
    # Envoy's own EDS request after the CDS update carries the old nonce: stale
    await envoy.request(ENDPOINT, ["a", "b"], eds.version_info, eds.nonce)
    await envoy.ack(cds)
    await envoy.ack(again, ["a", "b"])
    await xds.wait_acked(ENDPOINT, eds.version_info)
    await envoy.assert_quiet()


async def test_two_clients_both_get_updates(ads):
    xds, connect = ads
    one, two = connect("envoy-1"), connect("envoy-2")
    await cds_acked(xds, one)
    await cds_acked(xds, two)
    xds.publish(snap(clusters=("x",)))
    for envoy in (one, two):
        resp = await envoy.recv()
        assert names(resp) == ["x"]
        await envoy.ack(resp)
    await xds.wait_acked(CLUSTER, xds.current.version(CLUSTER), min_streams=2)
    assert set(xds.stats()["nodes"]) == {"envoy-1", "envoy-2"}


async def test_reconnect_with_current_version_still_gets_an_answer(ads):
    xds, connect = ads
    first = connect("envoy-r")
    resp = await cds_acked(xds, first)
    await first.close()
    await xds.wait_until(lambda: not xds.streams(), READ_TIMEOUT)
    again = connect("envoy-r")
    await again.request(CLUSTER, version=resp.version_info)
    resp2 = await again.recv()
    assert resp2.version_info == resp.version_info and names(resp2) == ["a", "b"]


def _our_tasks() -> list[asyncio.Task]:
    return [
        t
        for t in asyncio.all_tasks()
        if "AdsServer" in getattr(t.get_coro(), "__qualname__", "")
    ]


async def test_disconnect_cleans_up(ads):
    xds, connect = ads
    envoy = connect("envoy-gone")
    await cds_acked(xds, envoy)
    assert xds.stats()["streams"] == 1 and _our_tasks()  # the stream's reader
    await envoy.close()
    await xds.wait_until(lambda: xds.stats()["streams"] == 0, READ_TIMEOUT)
    assert "envoy-gone" not in xds.stats()["nodes"]
    assert not _our_tasks()
    xds.publish(snap(clusters=("z",)))  # no stream left to wake: no error


async def test_publish_from_another_thread(ads):
    xds, connect = ads
    envoy = connect()
    await cds_acked(xds, envoy)
    await asyncio.to_thread(xds.publish, snap(clusters=("t",)))
    resp = await envoy.recv()
    assert names(resp) == ["t"]


async def test_delta_is_unimplemented(ads):
    _, connect = ads
    envoy = connect()
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(envoy.channel)
    call = stub.DeltaAggregatedResources()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_wait_acked_times_out(ads):
    xds, _ = ads
    with pytest.raises(TimeoutError):
        await xds.wait_acked(CLUSTER, "nope", timeout=0.05)

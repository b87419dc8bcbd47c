"""Consul registration and watches (runtime.consul, runtime.upstream, the
scheduler's ConsulDiscovery, the control plane's catalog) against the Consul
agent stand-in (tests/fakes/consul_agent.py), with real gRPC health servers."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

FAKES = pathlib.Path(__file__).resolve().parents[2] / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))

from consul_agent import ConsulAgent  # noqa: E402
from fabric_testing import eventually  # noqa: E402

from llmfabric.cli.processes import free_port  # noqa: E402
from llmfabric.gateway.controlplane.catalog import ConsulCatalog  # noqa: E402
from llmfabric.runtime.consul import Registration, ServiceWatch  # noqa: E402
from llmfabric.runtime.errors import Unavailable  # noqa: E402
from llmfabric.runtime.upstream import Upstream, parse_target  # noqa: E402
from llmfabric.scheduler.discovery import ConsulDiscovery, StaticDiscovery, from_config  # noqa: E402

WAIT = 15.0  # generous: checks run every second on a shared 2-core machine


class HealthServer:
    """A gRPC server with only grpc.health.v1, whose status the test flips."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def start(self, serving: bool = True) -> HealthServer:
        await self.set(serving)
        await self.server.start()
        return self

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)

    async def stop(self) -> None:
        await self.server.stop(None)


@pytest.fixture
async def agent():
    a = ConsulAgent()
    await a.start()
    yield a
    await a.stop()


@pytest.fixture
async def servers():
    started: list[HealthServer] = []

    async def make(serving: bool = True) -> HealthServer:
        s = await HealthServer().start(serving)
        started.append(s)
        return s

    yield make
    for s in started:
        await s.stop()


def _ports(watch: ServiceWatch) -> list[int]:
    return sorted(i.port for i in watch.instances)


async def test_registration_becomes_passing_and_leaves_on_stop(agent, servers):
    srv = await servers()
    reg = Registration(agent.url, "tokenizer", "127.0.0.1", srv.port, meta={"model": "m"}, tags=("v1",))
    watch = ServiceWatch(agent.url, "tokenizer", wait="2s")
    await watch.start()
    await reg.start()
    try:
        await eventually(lambda: _ports(watch) == [srv.port], WAIT, "passing after the first gRPC check")
        inst = watch.instances[0]
        assert (inst.id, inst.address, inst.meta["model"], inst.tags) == (reg.service_id, "127.0.0.1", "m", ("v1",))
        check = next(iter(c for c in agent.checks.values() if c.service_id == reg.service_id))
        assert (check.kind, check.target, check.interval, check.deregister_after) == ("grpc", f"127.0.0.1:{srv.port}", 1.0, 60.0)
        assert reg.service_id in agent.services
        await reg.stop()
        assert reg.service_id not in agent.services
        await eventually(lambda: watch.instances == [], WAIT, "gone from the watch after deregistration")
    finally:
        await reg.stop()
        await watch.close()


async def test_not_serving_drops_out_and_comes_back(agent, servers):
    a, b = await servers(), await servers()
    regs = [Registration(agent.url, "worker", "127.0.0.1", s.port) for s in (a, b)]
    watch = ServiceWatch(agent.url, "worker", wait="5s")
    changes: list[list[int]] = []
    watch.subscribe(lambda insts: changes.append(sorted(i.port for i in insts)))
    await watch.start()
    for r in regs:
        await r.start()
    try:
        await eventually(lambda: _ports(watch) == sorted([a.port, b.port]), WAIT, "both passing")
        await a.set(False)
        await eventually(lambda: _ports(watch) == [b.port], WAIT, "NOT_SERVING instance dropped")
        await b.stop()  # a dead process: its check fails to connect
        await eventually(lambda: watch.instances == [], WAIT, "dead instance dropped")
        await a.set(True)
        await eventually(lambda: _ports(watch) == [a.port], WAIT, "recovered instance back")
        # listeners hear only real changes, never the same set twice in a row
        assert all(x != y for x, y in zip(changes, changes[1:], strict=False))
    finally:
        for r in regs:
            await r.stop()
        await watch.close()


async def test_reregisters_when_the_agent_forgets(agent, servers):
    srv = await servers()
    reg = Registration(agent.url, "scheduler", "127.0.0.1", srv.port, resync_seconds=0.2)
    await reg.start()
    try:
        await eventually(lambda: reg.service_id in agent.services, WAIT)
        agent.forget_all(reset_index=True)
        assert reg.service_id not in agent.services
        await eventually(lambda: reg.registrations >= 2 and reg.service_id in agent.services, WAIT, "registered again")
    finally:
        await reg.stop()


async def test_registration_waits_for_a_late_agent(servers):
    srv = await servers()
    port = free_port()
    reg = Registration(f"http://127.0.0.1:{port}", "semcache", "127.0.0.1", srv.port)
    await reg.start()
    late = ConsulAgent(port=port)
    try:
        await asyncio.sleep(0.5)  # a few failed attempts first
        assert reg.registrations == 0
        await late.start()
        await eventually(lambda: reg.service_id in late.services, WAIT, "registered once the agent is up")
    finally:
        await reg.stop()
        await late.stop()


async def test_watch_keeps_last_set_while_consul_is_down_and_follows_an_index_reset(servers):
    srv = await servers()
    agent = ConsulAgent()
    port = await agent.start()
    reg = Registration(agent.url, "frontend", "127.0.0.1", srv.port, resync_seconds=0.2)
    watch = ServiceWatch(agent.url, "frontend", wait="1s", reconnect_grace=2.0)
    await watch.start()
    await reg.start()
    try:
        await eventually(lambda: _ports(watch) == [srv.port], WAIT)
        await agent.stop()
        await eventually(lambda: watch.errors >= 2, WAIT, "queries failing")
        assert _ports(watch) == [srv.port]  # last known set kept
        # the agent comes back empty (a dev agent restart), with a lower index
        agent.forget_all(reset_index=True)
        await agent.start()
        assert agent.url.endswith(f":{port}")
        await eventually(lambda: watch.errors == 0 and reg.registrations >= 2, WAIT, "recovered and re-registered")
        await eventually(lambda: _ports(watch) == [srv.port], WAIT, "watch sees the re-registered instance")
        await reg.stop()
        await eventually(lambda: watch.instances == [], WAIT, "a deregistration after the reset is seen (after the grace)")
    finally:
        await reg.stop()
        await watch.close()
        await agent.stop()


async def test_an_empty_answer_right_after_an_outage_is_not_believed(servers):
    """A dev agent restarted without state lists nothing until services re-register:
    consumers keep their last known set for the grace period meanwhile."""
    srv = await servers()
    agent = ConsulAgent()
    await agent.start()
    reg = Registration(agent.url, "scheduler", "127.0.0.1", srv.port, resync_seconds=3600)  # never re-registers
    watch = ServiceWatch(agent.url, "scheduler", wait="1s", reconnect_grace=3.0)
    await watch.start()
    await reg.start()
    try:
        await eventually(lambda: _ports(watch) == [srv.port], WAIT)
        await agent.stop()
        await eventually(lambda: watch.errors >= 1, WAIT, "queries failing")
        agent.forget_all(reset_index=True)
        await agent.start()
        await eventually(lambda: watch.errors == 0, WAIT, "reconnected")
        assert _ports(watch) == [srv.port]  # the empty answer was not believed (yet)
        await eventually(lambda: watch.instances == [], WAIT, "believed once the grace is over")
    finally:
        await reg.stop()
        await watch.close()
        await agent.stop()


async def test_upstream_round_robins_over_consul_instances(agent, servers):
    a, b = await servers(), await servers()
    regs = [Registration(agent.url, "tokenizer", "127.0.0.1", s.port) for s in (a, b)]
    for r in regs:
        await r.start()
    up = Upstream("tokenizer", "consul:tokenizer", health_pb2_grpc.HealthStub, consul_url=agent.url)
    await up.start()
    try:
        await eventually(lambda: len(up.addresses()) == 2, WAIT)
        picked = {id(up.stub()) for _ in range(4)}
        assert len(picked) == 2
        reply = await up.stub().Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await a.set(False)
        await b.set(False)
        await eventually(lambda: up.addresses() == [], WAIT)
        with pytest.raises(Unavailable, match="no healthy tokenizer"):
            up.stub()
    finally:
        await up.close()
        for r in regs:
            await r.stop()


def test_targets_parse_and_name_the_setting():
    assert parse_target("consul:worker", "X").consul_service == "worker"
    assert parse_target("a:1, b:2", "X").addresses == ("a:1", "b:2")
    for bad in ("", "consul:", "host", "h:0", "h:99999", "consul:a/b"):
        with pytest.raises(ValueError, match="X"):
            parse_target(bad, "X")
    with pytest.raises(ValueError, match="needs a Consul address"):
        Upstream("tokenizer", "consul:tokenizer", health_pb2_grpc.HealthStub)


async def test_scheduler_discovery_and_control_plane_catalog_follow_consul(agent, servers):
    srv = await servers()
    assert isinstance(from_config(("h:1", "h:2"), ""), StaticDiscovery)
    discovery = from_config(("consul:worker",), agent.url)
    assert isinstance(discovery, ConsulDiscovery)
    seen = []
    discovery.subscribe(seen.append)
    catalog = ConsulCatalog(agent.url, "frontend")
    backends = []
    catalog.subscribe(backends.append)
    await discovery.start()
    await catalog.start()
    w = Registration(agent.url, "worker", "127.0.0.1", srv.port)
    f = Registration(agent.url, "frontend", "127.0.0.1", srv.port, meta={"http_port": "8123"})
    await w.start()
    await f.start()
    try:
        await eventually(lambda: [e.address for e in discovery.endpoints()] == [f"127.0.0.1:{srv.port}"], WAIT)
        assert discovery.endpoints()[0].id == w.service_id
        assert seen and seen[-1] == discovery.endpoints()
        await eventually(lambda: catalog.backends.http == (("127.0.0.1", 8123),), WAIT)
        assert catalog.backends.grpc == (("127.0.0.1", srv.port),)
        assert backends[-1] == catalog.backends
    finally:
        await w.stop()
        await f.stop()
        await discovery.close()
        await catalog.close()

"""The Consul agent stand-in (``tests/fakes/consul_agent.py``), driven through py-consul's asyncio client (as the
product is) and raw aiohttp where headers, status codes or malformed bodies matter. gRPC checks run against a real
in-test grpc.aio server with grpcio-health-checking's asyncio HealthServicer."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import signal
import sys

import aiohttp
import consul
import consul.aio
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

FAKES = pathlib.Path(__file__).resolve().parents[2] / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))

from consul_agent import BOOT_INDEX, ConsulAgent, format_duration, parse_duration
from fabric_testing import eventually  # tests/ is on sys.path (tests/conftest.py)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT = 10.0  # generous bound for anything that should happen "soon" on a shared, noisy machine


@pytest.fixture
async def make_agent():
    agents: list[ConsulAgent] = []

    async def make(**kw) -> ConsulAgent:
        kw.setdefault("check_interval_floor", 0.05)
        agent = ConsulAgent(**kw)
        await agent.start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.stop()


@pytest.fixture
async def agent(make_agent) -> ConsulAgent:
    return await make_agent()


@pytest.fixture
async def client(agent):
    c = consul.aio.Consul(host="127.0.0.1", port=agent.port)
    yield c
    await c.close()


@pytest.fixture
async def grpc_health_server():
    """A grpc.aio server with the asyncio health servicer: (server, servicer, port)."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield server, servicer, port
    await server.stop(None)


async def http(agent: ConsulAgent, method: str, path: str, body=None, params=None):
    """(status, headers, text) of a raw request; dict/list bodies are sent as JSON."""
    data = json.dumps(body) if isinstance(body, (dict, list)) else body
    async with aiohttp.ClientSession() as s, s.request(method, agent.url + path, data=data, params=params) as r:
        return r.status, r.headers, await r.text()


async def check_of(client, check_id: str) -> dict | None:
    return (await client.agent.checks()).get(check_id)


async def passing_ids(client, name: str) -> list[str]:
    _, nodes = await client.health.service(name, passing=True)
    return [n["Service"]["ID"] for n in nodes]


def test_go_durations():
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("0") == 0.0
    assert parse_duration(2_000_000_000) == 2.0  # JSON numbers are nanoseconds
    for bad in ("", "10", "5x", "soon", "1.5.3s"):
        with pytest.raises(ValueError, match="time: "):
            parse_duration(bad)
    assert [format_duration(s) for s in (0, 0.1, 1, 60, 90, 3600, 1.5)] == ["0s", "100ms", "1s", "1m0s", "1m30s",
                                                                              "1h0m0s", "1.5s"]


async def test_grpc_check_follows_the_health_service(agent, client, grpc_health_server):
    server, servicer, gport = grpc_health_server
    await servicer.set("llm.Worker", SERVING)
    target = f"127.0.0.1:{gport}/llm.Worker"
    check = consul.Check.grpc(target, "100ms", timeout="2s", deregister="1m")
    assert await client.agent.service.register("worker", service_id="w1", address="127.0.0.1", port=gport,
                                               tags=["gpu"], meta={"zone": "a"}, check=check)

    async def is_passing():
        return await passing_ids(client, "worker") == ["w1"]

    await eventually(is_passing, WAIT, "gRPC check passing")
    _, [entry] = await client.health.service("worker", passing=True)
    assert entry["Node"]["Node"] == agent.node_name and entry["Node"]["Datacenter"] == "dc1"
    assert entry["Service"]["Service"] == "worker" and entry["Service"]["Port"] == gport
    assert entry["Service"]["Tags"] == ["gpu"] and entry["Service"]["Meta"] == {"zone": "a"}
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", "service:w1"]
    chk = entry["Checks"][1]
    assert chk["Status"] == "passing" and chk["Type"] == "grpc" and chk["ServiceName"] == "worker"
    assert chk["Output"] == f"gRPC check {target}: success"
    assert chk["Definition"]["DeregisterCriticalServiceAfter"] == "1m0s" and chk["Timeout"] == "2s"

    await servicer.set("llm.Worker", NOT_SERVING)

    async def is_critical():
        return (await check_of(client, "service:w1"))["Status"] == "critical"

    await eventually(is_critical, WAIT, "NOT_SERVING -> critical")
    assert (await check_of(client, "service:w1"))["Output"] == f"gRPC {target} serving status: NOT_SERVING"
    assert await passing_ids(client, "worker") == []
    _, nodes = await client.health.service("worker")
    assert [n["Service"]["ID"] for n in nodes] == ["w1"]  # still registered, just not passing

    await servicer.set("llm.Worker", SERVING)
    await eventually(is_passing, WAIT, "SERVING again -> passing")

    await server.stop(None)
    await eventually(is_critical, WAIT, "server gone -> critical")
    assert (await check_of(client, "service:w1"))["Output"].startswith("rpc error: code = Unavailable desc = ")


async def test_grpc_check_targets_and_check_ids(agent, client, grpc_health_server):
    _, _, gport = grpc_health_server  # "" is SERVING by default; "nope.Svc" is unknown (NOT_FOUND)
    checks = [{"GRPC": f"127.0.0.1:{gport}", "Interval": "100ms"},
              {"grpc": f"127.0.0.1:{gport}/nope.Svc", "interval": "100ms"}]
    status, _, text = await http(agent, "PUT", "/v1/agent/service/register", {"Name": "multi", "Checks": checks})
    assert (status, text) == (200, "")

    async def settled():
        got = await client.agent.checks()
        return got.get("service:multi:1", {}).get("Status") == "passing" and got["service:multi:2"]["Output"]

    await eventually(settled, WAIT, "both gRPC checks ran")
    second = await check_of(client, "service:multi:2")
    assert second["Status"] == "critical" and second["Output"].startswith("rpc error: code = NotFound")
    assert await passing_ids(client, "multi") == []  # passing means every check passes


async def test_ttl_checks_initial_status_and_updates(agent, client):
    assert await client.agent.service.register("t", service_id="t1", check=consul.Check.ttl("30s"))
    assert await client.agent.service.register("t", service_id="t2", check={"TTL": "30s", "Status": "passing"})
    assert (await check_of(client, "service:t1"))["Status"] == "critical"  # Consul's default
    assert await passing_ids(client, "t") == ["t2"]

    assert await client.agent.check.ttl_warn("service:t2", "slow")
    assert await passing_ids(client, "t") == []  # warning is not passing
    assert (await check_of(client, "service:t2"))["Output"] == "slow"
    assert await client.agent.check.ttl_pass("service:t1")
    assert await client.agent.check.ttl_pass("service:t2")
    assert await passing_ids(client, "t") == ["t1", "t2"]
    assert await client.agent.check.ttl_fail("service:t1", "down")
    assert await passing_ids(client, "t") == ["t2"]

    assert not await client.agent.check.ttl_pass("service:nope")  # 404
    status, _, text = await http(agent, "PUT", "/v1/agent/check/pass/service:nope")
    assert status == 404 and text.startswith('Unknown check ID "service:nope"')

    assert await client.agent.service.register("short", service_id="s1", check={"TTL": "200ms", "Status": "passing"})
    assert await client.agent.check.ttl_pass("service:s1", "alive")

    async def expired():
        return (await check_of(client, "service:s1"))["Status"] == "critical"

    await eventually(expired, WAIT, "TTL expiry")
    output = (await check_of(client, "service:s1"))["Output"]
    assert output == "TTL expired (last output before timeout follows): alive"


async def test_ttl_update_on_a_grpc_check_is_a_500(agent, client):
    assert await client.agent.service.register("g", service_id="g1", check=consul.Check.grpc("127.0.0.1:1", "10s"))
    with pytest.raises(consul.ConsulException, match='CheckID "service:g1" does not have associated TTL'):
        await client.agent.check.ttl_pass("service:g1")


async def test_blocking_query_returns_promptly_on_a_change(agent, client):
    assert await client.agent.service.register("b", service_id="b1", check={"TTL": "30s", "Status": "passing"})
    index, _ = await client.health.service("b")
    waiter = asyncio.create_task(client.health.service("b", index=index, wait="30s"))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    assert await client.agent.check.ttl_fail("service:b1", "boom")
    new_index, [entry] = await asyncio.wait_for(waiter, WAIT)  # well before the 30s wait
    assert int(new_index) > int(index)
    assert entry["Checks"][1]["Status"] == "critical" and entry["Checks"][1]["Output"] == "boom"
    assert entry["Checks"][1]["ModifyIndex"] == int(new_index)

    waiter = asyncio.create_task(client.health.service("b", index=new_index, wait="30s"))
    await asyncio.sleep(0.1)
    assert await client.agent.service.register("b", service_id="b2")  # a new instance of the same service
    newer, nodes = await asyncio.wait_for(waiter, WAIT)
    assert int(newer) > int(new_index) and [n["Service"]["ID"] for n in nodes] == ["b1", "b2"]


async def test_blocking_query_returns_after_wait_with_the_same_index(agent, client):
    assert await client.agent.service.register("b", service_id="b1", check={"TTL": "30s", "Status": "passing"})
    index, _ = await client.health.service("b")
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiter = asyncio.create_task(client.health.service("b", index=index, wait="1s"))
    await asyncio.sleep(0.1)
    assert await client.agent.service.register("other", service_id="o1")  # another service: not b's index
    assert await client.agent.check.ttl_pass("service:b1", "new output")  # output-only change: no new index
    same, [entry] = await asyncio.wait_for(waiter, WAIT)
    elapsed = loop.time() - started
    assert same == index and entry["Checks"][1]["Output"] == "new output"
    assert 0.9 <= elapsed < WAIT  # the whole wait (plus at most 1/16 jitter), never less

    fresh, _ = await asyncio.wait_for(client.health.service("b", index="0"), WAIT)  # index 0 never blocks
    assert fresh == index


async def test_index_goes_backwards_after_forget_all(agent, client):
    for sid in ("x1", "x2", "x3"):
        assert await client.agent.service.register("x", service_id=sid)
    assert await client.agent.service.deregister("x3")
    high, nodes = await client.health.service("x")
    assert int(high) > BOOT_INDEX + 3 and len(nodes) == 2

    agent.forget_all()  # a restarted dev agent: state and raft index are gone
    assert await client.agent.services() == {} and await client.agent.checks() == {}
    low, nodes = await client.health.service("x")
    assert nodes == [] and 1 <= int(low) < int(high)

    # a client still holding the old index blocks for the whole wait, then sees the lower index (Consul does this;
    # clients must reset their index when it goes backwards)
    loop = asyncio.get_running_loop()
    started = loop.time()
    again, _ = await asyncio.wait_for(client.health.service("x", index=high, wait="300ms"), WAIT)
    assert again == low and loop.time() - started >= 0.25

    assert await client.agent.service.register("x", service_id="x1")
    after, nodes = await client.health.service("x")
    assert int(low) < int(after) < int(high) and len(nodes) == 1

    # without the reset the index keeps increasing, and the change wakes blocked queries
    waiter = asyncio.create_task(client.health.service("x", index=after, wait="30s"))
    await asyncio.sleep(0.1)
    agent.forget_all(reset_index=False)
    later, nodes = await asyncio.wait_for(waiter, WAIT)
    assert nodes == [] and int(later) > int(after)


async def test_restart_keeps_port_and_checks_resume(agent, client, grpc_health_server):
    _, _, gport = grpc_health_server
    check = consul.Check.grpc(f"127.0.0.1:{gport}", "100ms")
    assert await client.agent.service.register("r", service_id="r1", check=check)
    port = agent.port
    await agent.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await http(agent, "GET", "/v1/status/leader")
    agent.forget_all()
    assert await agent.start() == port
    assert await client.agent.services() == {}
    assert await client.agent.service.register("r", service_id="r1", check=check)

    async def passing():
        return await passing_ids(client, "r") == ["r1"]

    await eventually(passing, WAIT, "check runs after restart")


async def test_deregister(agent, client):
    assert await client.agent.service.register("d", service_id="d1", check={"TTL": "30s", "Status": "passing"})
    index, _ = await client.health.service("d")
    assert await client.agent.service.deregister("d1")
    assert await client.agent.services() == {} and await client.agent.checks() == {}
    after, nodes = await client.health.service("d")
    assert nodes == [] and int(after) > int(index)

    assert not await client.agent.service.deregister("d1")  # py-consul maps Consul's 404 to False
    status, _, text = await http(agent, "PUT", "/v1/agent/service/deregister/d1")
    assert status == 404 and text.startswith('Unknown service ID "d1".')
    status, _, text = await http(agent, "GET", "/v1/agent/service/d1")
    assert (status, text) == (404, "unknown service ID: d1")
    assert await client.agent.service_definition("d1") is None


async def test_reaper_deregisters_long_critical_services(make_agent):
    agent = await make_agent(reap_interval=0.05, min_deregister_after=0.2)
    async with consul.aio.Consul(host="127.0.0.1", port=agent.port) as client:
        dead = consul.Check.grpc("127.0.0.1:1", "100ms", deregister="10ms")  # nothing listens there: critical
        assert await client.agent.service.register("gone", service_id="gone1", check=dead)
        kept = {"TTL": "30s", "Status": "passing", "DeregisterCriticalServiceAfter": "10ms"}
        assert await client.agent.service.register("kept", service_id="kept1", check=kept)
        assert await client.agent.service.register("nodereg", service_id="n1", check=consul.Check.ttl("30s"))

        async def reaped():
            return "gone1" not in await client.agent.services()

        await eventually(reaped, WAIT, "critical service reaped")
        assert set(await client.agent.services()) == {"kept1", "n1"}


async def test_reaper_enforces_the_minimum(make_agent):
    agent = await make_agent(reap_interval=0.05)  # min_deregister_after keeps Consul's 1 minute
    async with consul.aio.Consul(host="127.0.0.1", port=agent.port) as client:
        check = {"TTL": "30s", "DeregisterCriticalServiceAfter": "100ms"}
        assert await client.agent.service.register("m", service_id="m1", check=check)
        await asyncio.sleep(0.5)
        assert "m1" in await client.agent.services()


async def test_register_accepts_consul_key_spellings_and_replaces_like_consul(agent, client):
    body = {"NAME": "k", "ID": "k1", "Tags": ["a"], "enable_tag_override": True,
            "Checks": [{"ttl": "30s", "status": "passing"},
                       {"TTL": "30s", "check_id": "custom", "Name": "mine",
                        "deregister_critical_service_after": "90s"}]}
    status, _, _ = await http(agent, "PUT", "/v1/agent/service/register", body)
    assert status == 200
    checks = await client.agent.checks()
    assert set(checks) == {"service:k1:1", "custom"}
    assert checks["custom"]["Name"] == "mine" and checks["service:k1:1"]["Name"] == "Service 'k' check"
    assert checks["custom"]["Definition"]["DeregisterCriticalServiceAfter"] == "1m30s"
    assert (await client.agent.services())["k1"]["EnableTagOverride"] is True
    assert await client.agent.check.ttl_pass("custom")

    index, _ = await client.health.service("k")
    status, _, _ = await http(agent, "PUT", "/v1/agent/service/register", body)  # identical: no new index
    assert status == 200 and (await client.health.service("k"))[0] == index

    # same ID again, fewer checks: the kept check keeps its status; the other stays (no replace-existing-checks)
    custom = {"TTL": "30s", "CheckID": "custom"}
    assert await client.agent.service.register("k", service_id="k1", tags=["b"], check=custom)
    checks = await client.agent.checks()
    assert set(checks) == {"service:k1:1", "custom"} and checks["custom"]["Status"] == "passing"
    assert checks["custom"]["ServiceTags"] == ["b"]
    new_index, [entry] = await client.health.service("k")
    assert int(new_index) > int(index) and entry["Service"]["Tags"] == ["b"]
    assert entry["Service"]["ModifyIndex"] == int(new_index) > entry["Service"]["CreateIndex"]

    assert await client.agent.service.register("k", service_id="k1", check=custom, replace_existing_checks=True)
    assert set(await client.agent.checks()) == {"custom"}


async def test_validation_errors(agent, client):
    cases = [
        ({}, "Missing service name"),
        ({"Name": "v", "Address": "0.0.0.0"}, "Invalid service address"),
        ({"Name": "v", "Port": "80"}, "Request decode failed: "),
        ({"Name": "v", "Check": {"GRPC": "127.0.0.1:1", "Interval": "soon"}},
         'Request decode failed: time: invalid duration "soon"'),
        ({"Name": "v", "Check": {"GRPC": "127.0.0.1:1"}},
         "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"),
        ({"Name": "v", "Checks": [{}]}, "Invalid check: TTL must be > 0 for TTL checks"),
        ({"Name": "v", "Check": {"Name": "no kind"}}, "Invalid check: TTL must be > 0 for TTL checks"),
        ({"Name": "v", "Check": {"TTL": "10s", "Interval": "1s"}},
         "Invalid check: Interval and TTL cannot both be specified"),
        ({"Name": "v", "Check": {"TTL": "10s", "Status": "fine"}},
         "Status for checks must 'passing', 'warning', 'critical'"),
        ({"Name": "v", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "1s"}},
         "consul-standin does not run http checks"),
        ("{not json", "Request decode failed: "),
        ("", "Request decode failed: EOF"),
        ("[]", "Request decode failed: json: cannot unmarshal array"),
    ]
    for body, message in cases:
        status, _, text = await http(agent, "PUT", "/v1/agent/service/register", body)
        assert (status, text[: len(message)]) == (400, message), body
    assert await client.agent.services() == {}
    with pytest.raises(consul.exceptions.BadRequest, match="Missing service name"):
        await client.agent.service.register("")

    for params, expected in [({"index": "abc"}, (400, "Invalid index")),
                             ({"index": "1", "wait": "later"}, (400, "Invalid wait time")),
                             ({"passing": "maybe"}, (400, "Invalid value for ?passing")),
                             ({"dc": "dc2"}, (500, "No path to datacenter")),
                             ({"stale": "", "consistent": ""}, (400, "Cannot specify ?stale with ?consistent")),
                             ({"filter": "Service.Port == 1"}, (400, "consul-standin does not implement ?filter"))]:
        status, _, text = await http(agent, "GET", "/v1/health/service/v", params=params)
        assert (status, text[: len(expected[1])]) == expected, params

    assert (await http(agent, "GET", "/v1/nope"))[::2] == (404, "404 page not found")
    assert (await http(agent, "GET", "/v1/agent/service/register"))[::2] == (405, "method GET not allowed")
    assert (await http(agent, "PUT", "/v1/agent/services"))[0] == 405


async def test_health_headers_filters_and_agent_endpoints(agent, client):
    status, headers, text = await http(agent, "GET", "/v1/health/service/unknown")
    assert (status, json.loads(text)) == (200, [])
    assert int(headers["X-Consul-Index"]) >= 1 and headers["X-Consul-KnownLeader"] == "true"
    assert headers["X-Consul-LastContact"] == "0" and headers["X-Consul-Effective-Consistency"] == "leader"
    _, headers, _ = await http(agent, "GET", "/v1/health/service/unknown", params={"stale": ""})
    assert headers["X-Consul-Effective-Consistency"] == "stale"

    assert await client.agent.service.register("t", service_id="t1", tags=["A", "b"])
    assert await client.agent.service.register("t", service_id="t2", tags=["b"])
    ids = lambda nodes: [n["Service"]["ID"] for n in nodes]
    assert ids((await client.health.service("t", tag="a"))[1]) == ["t1"]
    assert ids((await client.health.service("t", tag=["a", "B"]))[1]) == ["t1"]
    assert ids((await client.health.service("t", tag="b"))[1]) == ["t1", "t2"]
    assert ids((await client.health.service("t", dc="dc1"))[1]) == ["t1", "t2"]

    assert await client.status.leader() == "127.0.0.1:8300"
    me = await client.agent.self()
    assert me["Config"]["NodeName"] == agent.node_name and me["Config"]["Datacenter"] == "dc1"
    definition = await client.agent.service_definition("t1")
    assert definition["Service"] == "t" and definition["Tags"] == ["A", "b"] and definition["ContentHash"]
    assert definition["Weights"] == {"Passing": 1, "Warning": 1}


async def test_subprocess_mode_serves_and_stops_on_sigterm():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FAKES / "consul_agent.py"), "--port", "0", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        match = re.match(rb"CONSUL_STANDIN_READY port=(\d+) url=(\S+)", line)
        assert match, line
        port = int(match.group(1))
        async with consul.aio.Consul(host="127.0.0.1", port=port) as client:
            assert await client.status.leader() == "127.0.0.1:8300"
            assert await client.agent.service.register("p", service_id="p1")
            assert [n["Service"]["ID"] for n in (await client.health.service("p"))[1]] == ["p1"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/v1/status/leader"):
                pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

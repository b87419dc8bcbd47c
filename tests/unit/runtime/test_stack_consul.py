"""``llmfabric up`` with Consul: the plan wires every service to it, and the
launcher starts `consul agent -dev` from PATH (here tests/fakes/bin/consul,
which runs the agent stand-in) and waits for its leader."""

from __future__ import annotations

import os
import pathlib
import sys
import time

import pytest

from llmfabric.cli.processes import stop_all
from llmfabric.cli.stack import Stack, StackOptions, _consul_ready

FAKE_BIN = pathlib.Path(__file__).resolve().parents[2] / "fakes" / "bin"


def _env(svc) -> dict[str, str]:
    return svc.child.env


def test_consul_plan_points_every_consumer_at_consul(tmp_path):
    st = Stack(StackOptions(workers=2, frontends=2, discovery="consul", consul_url="http://127.0.0.1:8500",
                            state_dir=tmp_path))
    st.plan()
    assert not st.of_kind("consul")  # an agent was given: none is started
    for svc in st.services:
        prefix = next(k for k in _env(svc) if k.endswith("_HOST")).removesuffix("HOST")
        assert _env(svc)[f"{prefix}CONSUL"] == "http://127.0.0.1:8500", svc.name
    assert _env(st.get("scheduler"))["LLMFABRIC_SCHEDULER_WORKERS"] == "consul:worker"
    front = _env(st.get("frontend-0"))
    assert (front["LLMFABRIC_FRONTEND_TOKENIZER"], front["LLMFABRIC_FRONTEND_SCHEDULER"],
            front["LLMFABRIC_FRONTEND_SEMCACHE"]) == ("consul:tokenizer", "consul:scheduler", "consul:semcache")
    assert _env(st.get("xds"))["LLMFABRIC_XDS_FRONTEND"] == "consul:frontend"


def test_static_plan_uses_planned_addresses(tmp_path):
    st = Stack(StackOptions(workers=2, state_dir=tmp_path, semcache=False))
    st.plan()
    assert all("LLMFABRIC_" not in k or not k.endswith("_CONSUL") for s in st.services for k in _env(s))
    assert _env(st.get("scheduler"))["LLMFABRIC_SCHEDULER_WORKERS"] == ",".join(w.grpc for w in st.of_kind("worker"))
    assert _env(st.get("xds"))["LLMFABRIC_XDS_FRONTEND"] == st.get("frontend").grpc
    assert _env(st.get("xds"))["LLMFABRIC_XDS_AUTH"] == "false"


def test_consul_discovery_needs_an_agent(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no consul binary
    with pytest.raises(RuntimeError, match="needs a Consul agent"):
        Stack(StackOptions(discovery="consul", state_dir=tmp_path)).plan()


def test_a_dev_agent_is_started_from_path(tmp_path, monkeypatch):
    # the fake's `#!/usr/bin/env python3` must find this interpreter (grpc, aiohttp)
    monkeypatch.setenv("PATH", f"{FAKE_BIN}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    st = Stack(StackOptions(discovery="consul", state_dir=tmp_path))
    st.plan()
    agent = st.get("consul")
    assert agent.child.argv[1:3] == ["agent", "-dev"]
    assert st.consul_url == f"http://{agent.http}"
    agent.child.start({"PATH": os.environ["PATH"]})
    try:
        deadline = time.monotonic() + 30
        while _consul_ready(agent.http) != "SERVING":
            assert agent.child.alive, agent.child.log_tail()
            assert time.monotonic() < deadline, "the dev agent never reported a leader"
            time.sleep(0.1)
    finally:
        stop_all([agent.child], grace=5)

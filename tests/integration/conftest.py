"""The real stack (tokenizer, embedded worker with the real model, scheduler,
frontend, Envoy) on loopback ports chosen at run time, shared by the
integration tests of one session and stopped at the end."""

from __future__ import annotations

import asyncio

import pytest

from fabric_testing import ConsulProcess
from llmfabric.cli.processes import free_port
from llmfabric.cli.stack import Stack, StackOptions
from llmfabric.gateway.apikeys import generate_api_key

TENANT = "itest"  # the tenant of the shared stack's API key
API_KEY = generate_api_key()  # made up per session, never written to the repo


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    opts = StackOptions(
        workers=1,
        edge_port=free_port(),
        admin_port=free_port(),
        state_dir=tmp_path_factory.mktemp("stack"),
        drain_seconds=3.0,
        capacity=4,
        context_length=2048,
        semcache=False,  # these tests need the engine to answer; test_semcache_edge.py runs its own stack with it
        api_keys=f"{API_KEY}:{TENANT}",
    )
    st = Stack(opts)
    asyncio.run(st.start())
    yield st
    st.stop()


@pytest.fixture(scope="session")
def edge(stack: Stack) -> str:
    """host:port of the Envoy edge (gRPC, REST/SSE and OpenAI HTTP)."""
    return f"{stack.opts.host}:{stack.opts.edge_port}"


@pytest.fixture(scope="session")
def admin(stack: Stack) -> str:
    return f"{stack.opts.host}:{stack.opts.admin_port}"


@pytest.fixture(scope="session")
def worker_address(stack: Stack) -> str:
    return stack.get("worker-0").grpc


@pytest.fixture(scope="session")
def api_key(stack: Stack) -> str:
    """The shared stack's API key (tenant ``itest``)."""
    return API_KEY


@pytest.fixture(scope="module")
def consul():
    """The Consul agent stand-in as a process of its own (killable, restartable), per test module."""
    c = ConsulProcess(free_port())
    c.start()
    yield c
    c.kill()

"""``llmfabric serve envoy`` and ``serve xds`` as the containers run them:
the real control plane and the real Envoy from the bootstrap the deploy files
mount (with the ops listener), a slow streaming upstream in the test. Checks
the ops listener exposes only /ready and /stats/prometheus, and that SIGTERM
drains: a stream in flight finishes, then the supervisor exits 0."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import random
import signal
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from fabric_testing import LLMFABRIC_CLI, eventually, http_status, stop_process
from llmfabric.cli.processes import free_port
from llmfabric.gateway.render import render_ads_bootstrap
from llmfabric.runtime.health import check

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHUNKS = 15  # the slow upstream's SSE events, 0.2 s apart


@dataclasses.dataclass
class Edge:
    envoy: subprocess.Popen[bytes]
    xds: subprocess.Popen[bytes]
    edge_port: int
    ops_port: int
    admin_port: int
    log: pathlib.Path


async def _slow_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(CHUNKS):
        await resp.write(f"data: {i}\n\n".encode())
        await asyncio.sleep(0.2)
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _slow_sse)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


def _spawn(args: list[str], env: dict[str, str], log: pathlib.Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([*LLMFABRIC_CLI, *args], env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture
async def edge(upstream: int, tmp_path: pathlib.Path) -> AsyncIterator[Edge]:
    xds_port, edge_port, ops_port, admin_port = free_port(), free_port(), free_port(), free_port()
    log = tmp_path / "edge.log"
    xds = _spawn(["serve", "xds"], {
        "LLMFABRIC_XDS_HOST": "127.0.0.1", "LLMFABRIC_XDS_PORT": str(xds_port), "LLMFABRIC_XDS_METRICS_PORT": "-1",
        "LLMFABRIC_XDS_FRONTEND": f"127.0.0.1:{free_port()}", "LLMFABRIC_XDS_FRONTEND_HTTP": f"127.0.0.1:{upstream}",
        "LLMFABRIC_XDS_AUTH": "false", "LLMFABRIC_XDS_RATE_LIMIT_RPS": "0",
        "LLMFABRIC_XDS_LISTEN_HOST": "127.0.0.1", "LLMFABRIC_XDS_LISTEN_PORT": str(edge_port),
        "LLMFABRIC_XDS_DESCRIPTOR_PATH": str(ROOT / "build" / "llmfabric.pb"),
    }, log)
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(render_ads_bootstrap("edge-test", "127.0.0.1", admin_port, "127.0.0.1", xds_port,
                                              ops_port=ops_port, ops_host="127.0.0.1"))
    envoy = _spawn(["serve", "envoy"], {
        "LLMFABRIC_ENVOY_BOOTSTRAP": str(bootstrap), "LLMFABRIC_ENVOY_ADMIN_PORT": str(admin_port),
        "LLMFABRIC_ENVOY_DRAIN_SECONDS": "60", "LLMFABRIC_ENVOY_BASE_ID": str(random.randrange(1000, 1_000_000)),
        "LLMFABRIC_ENVOY_LOG_LEVEL": "warning", "LLMFABRIC_ENVOY_CONCURRENCY": "1",
    }, log)
    running = Edge(envoy, xds, edge_port, ops_port, admin_port, log)
    try:
        try:
            await eventually(lambda: _xds_serving(xds_port), timeout=60, what="xds SERVING")
            await eventually(lambda: envoy.poll() is not None or http_status(f"http://127.0.0.1:{ops_port}/ready") == 200, timeout=60,
                             what="envoy /ready on the ops port")
            assert envoy.poll() is None, "envoy exited"
        except AssertionError as err:
            raise AssertionError(f"{err}; log:\n{_tail(log)}") from None
        yield running
    finally:
        stop_process(envoy)
        stop_process(xds)


async def _xds_serving(port: int) -> bool:
    return await check(f"127.0.0.1:{port}", timeout=1) == "SERVING"


def _tail(log: pathlib.Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""




async def test_ops_listener_serves_only_ready_and_metrics(edge: Edge) -> None:
    assert http_status(f"http://127.0.0.1:{edge.ops_port}/ready") == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{edge.ops_port}/stats/prometheus") as resp:
            assert resp.status == 200
            assert "envoy_server_live" in await resp.text()
    # the admin interface's dangerous paths are not reachable through it
    for path, method in (("/config_dump", "GET"), ("/quitquitquit", "POST"), ("/healthcheck/fail", "POST"),
                         ("/stats/prometheus", "POST"), ("/ready/../config_dump", "GET")):
        assert http_status(f"http://127.0.0.1:{edge.ops_port}{path}", method) == 404, (path, method)
    assert edge.envoy.poll() is None
    assert http_status(f"http://127.0.0.1:{edge.ops_port}/ready") == 200


async def test_sigterm_drains_a_stream_in_flight_then_exits_clean(edge: Edge) -> None:
    url = f"http://127.0.0.1:{edge.edge_port}/v1/chat/completions"
    events: list[str] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"model": "x", "stream": True}) as resp:
            assert resp.status == 200, await resp.text()
            first = await resp.content.readline()
            events.append(first.decode().strip())
            edge.envoy.send_signal(signal.SIGTERM)
            await eventually(lambda: http_status(f"http://127.0.0.1:{edge.ops_port}/ready") != 200, timeout=10,
                             what="/ready fails once draining")
            async for line in resp.content:
                if line.strip():
                    events.append(line.decode().strip())
    assert events == [f"data: {i}" for i in range(CHUNKS)] + ["data: [DONE]"]
    code = await asyncio.to_thread(edge.envoy.wait, 60)
    assert code == 0, _tail(edge.log)
    assert "draining listeners" in _tail(edge.log)


async def test_bad_bootstrap_path_is_a_config_error(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([*LLMFABRIC_CLI, "serve", "envoy"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LLMFABRIC_ENVOY_BOOTSTRAP": str(tmp_path / "missing.yaml")})
    assert proc.returncode == 2
    assert "LLMFABRIC_ENVOY_BOOTSTRAP" in proc.stderr and "no such file" in proc.stderr


async def test_rejected_bootstrap_is_a_config_error(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bootstrap.yaml"
    bad.write_text("static_resources: {clusters: [{name: x, type: NOPE}]}\n")
    proc = subprocess.run([*LLMFABRIC_CLI, "serve", "envoy"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLMFABRIC_ENVOY_BOOTSTRAP": str(bad)})
    assert proc.returncode == 2
    assert "envoy rejected" in proc.stderr

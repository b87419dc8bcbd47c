"""``llmfabric serve`` / ``probe`` (the container entrypoint and health
check) and the service table the deploy files are held to."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import pytest

from fabric_testing import LLMFABRIC_CLI, eventually
from llmfabric.cli.container import SERVICES, probe
from llmfabric.cli.processes import free_port
from llmfabric.runtime.config import ServerSettings
from llmfabric.runtime.health import check
from llmfabric.runtime.server import LIVENESS, ServiceHost

def test_container_defaults_bind_every_address_on_the_well_known_ports() -> None:
    front = SERVICES["frontend"].environment()
    assert front["LLMFABRIC_FRONTEND_HOST"] == "0.0.0.0"
    assert front["LLMFABRIC_FRONTEND_PORT"] == "50051"
    assert front["LLMFABRIC_FRONTEND_METRICS_PORT"] == "9464"
    assert front["LLMFABRIC_FRONTEND_HTTP_PORT"] == "8000"
    xds = SERVICES["xds"].environment()
    assert xds["LLMFABRIC_XDS_PORT"] == "18000" and xds["LLMFABRIC_XDS_DESCRIPTOR_PATH"].endswith("llmfabric.pb")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_container_default_is_a_real_setting(name: str) -> None:
    svc = SERVICES[name]
    assert set(svc.environment()) <= svc.variables()
    assert svc.prefix + "CONSUL" in svc.variables()  # every service can register in Consul


def test_probe_reports_an_unreachable_service() -> None:
    os.environ["LLMFABRIC_TOKENIZER_PORT"] = str(free_port())
    try:
        ok, detail = probe("tokenizer", timeout=1)
    finally:
        del os.environ["LLMFABRIC_TOKENIZER_PORT"]
    assert not ok and "UNREACHABLE" in detail


async def test_liveness_is_serving_while_the_service_is_not_ready() -> None:
    port = free_port()
    host = ServiceHost("t", ServerSettings(host="127.0.0.1", port=port, metrics_port=-1))
    await host.start()
    try:
        assert await check(f"127.0.0.1:{port}") == "NOT_SERVING"  # loading
        assert await check(f"127.0.0.1:{port}", LIVENESS) == "SERVING"
        await host.set_serving(True)
        assert await check(f"127.0.0.1:{port}") == "SERVING"
        await host.set_serving(False)
        assert await check(f"127.0.0.1:{port}", LIVENESS) == "SERVING"
    finally:
        await host.drain(0)


async def test_serve_runs_the_service_with_container_defaults_and_env_wins() -> None:
    port, metrics = free_port(), free_port()
    env = {**os.environ, "LLMFABRIC_TOKENIZER_HOST": "127.0.0.1", "LLMFABRIC_TOKENIZER_PORT": str(port),
           "LLMFABRIC_TOKENIZER_METRICS_PORT": str(metrics), "LLMFABRIC_TOKENIZER_DRAIN_SECONDS": "1"}
    proc = subprocess.Popen([*LLMFABRIC_CLI, "serve", "tokenizer"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async def probed() -> bool:
            if proc.poll() is not None:
                return True
            res = await asyncio.to_thread(subprocess.run, [*LLMFABRIC_CLI, "probe", "tokenizer"], env=env,
                                          capture_output=True, text=True)
            return res.returncode == 0

        await eventually(probed, timeout=120, interval=0.5, what="`llmfabric probe tokenizer` exits 0")
        assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
        # exec: the service itself is the process the container runtime signals
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert f"127.0.0.1:{port}" in out  # the explicit variable beat the 0.0.0.0:50051 default


def test_serve_reports_a_bad_setting_by_its_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFABRIC_SCHEDULER_")}
    env["LLMFABRIC_SCHEDULER_PORT"] = str(free_port())
    res = subprocess.run([*LLMFABRIC_CLI, "serve", "scheduler"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "LLMFABRIC_SCHEDULER_WORKERS is required" in res.stderr


def test_serve_rejects_an_unknown_service() -> None:
    res = subprocess.run([*LLMFABRIC_CLI, "serve", "nope"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "invalid choice" in res.stderr

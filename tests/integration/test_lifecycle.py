"""Cancellation, worker failure, graceful drain and the `llmfabric` CLI
against real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import grpc
import pytest
from fabric_testing import bearer, edge_channel

from llmfabric.cli.processes import free_port
from llmfabric.cli.stack import Stack, StackOptions
from llmfabric.common.v1 import common_pb2
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

LONG = [
    common_pb2.ChatMessage(role="system", content="You are a helpful assistant."),
    common_pb2.ChatMessage(role="user", content="Write a very long essay about the history of the Roman empire."),
]


def _metric(address: str, name: str, labels: str = "") -> float:
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()  # noqa: S310 - loopback
    for line in body.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _load(address: str) -> worker_pb2.GetLoadResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        return await worker_pb2_grpc.WorkerServiceStub(ch).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


async def _wait_idle(address: str, polls: int = 100) -> worker_pb2.GetLoadResponse:
    """Poll the worker until nothing runs (bounded; not a timing assert)."""
    for _ in range(polls):
        load = await _load(address)
        if load.running == 0 and load.waiting == 0:
            return load
        await asyncio.sleep(0.1)
    return load


async def test_grpc_client_disconnect_frees_the_worker(edge, stack, api_key):
    worker = stack.get("worker-0")
    before = _metric(worker.metrics, "llmfabric_worker_requests_total", 'finish_reason="cancelled"')
    channel = edge_channel(edge, api_key)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    call = stub.ChatStream(inference_pb2.ChatStreamRequest(
        messages=LONG, options=inference_pb2.RequestOptions(sampling=common_pb2.SamplingParams(max_tokens=1500, temperature=0.8))))
    got = 0
    async for _ in call:
        got += 1
        if got == 3:
            break
    assert (await _load(worker.grpc)).running == 1
    call.cancel()
    await channel.close()
    load = await _wait_idle(worker.grpc)
    assert load.running == 0
    async with grpc.aio.insecure_channel(worker.grpc) as ch:  # what is left is prefix cache: flushable
        await worker_pb2_grpc.WorkerServiceStub(ch).FlushCache(worker_pb2.FlushCacheRequest(), timeout=10)
    assert (await _load(worker.grpc)).kv_used == 0
    assert _metric(worker.metrics, "llmfabric_worker_requests_total", 'finish_reason="cancelled"') == before + 1


async def test_http_client_disconnect_frees_the_worker(edge, stack, api_key):
    worker = stack.get("worker-0")
    before = _metric(worker.metrics, "llmfabric_worker_requests_total", 'finish_reason="cancelled"')
    payload = {"stream": True, "max_tokens": 1500, "temperature": 0.8,
               "messages": [{"role": m.role, "content": m.content} for m in LONG]}
    async with aiohttp.ClientSession(headers=bearer(api_key)) as session:
        resp = await session.post(f"http://{edge}/v1/chat/completions", json=payload)
        assert resp.status == 200
        for _ in range(3):
            await resp.content.readline()
        resp.close()  # drop the connection mid-stream
    load = await _wait_idle(worker.grpc)
    assert load.running == 0
    assert _metric(worker.metrics, "llmfabric_worker_requests_total", 'finish_reason="cancelled"') == before + 1


async def test_deadline_reaches_the_worker(edge, stack, api_key):
    async with edge_channel(edge, api_key) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Chat(inference_pb2.ChatRequest(messages=LONG, options=inference_pb2.RequestOptions(
                sampling=common_pb2.SamplingParams(max_tokens=1500, temperature=0.8))), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await _wait_idle(stack.get("worker-0").grpc)).running == 0


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    opts = StackOptions(workers=2, edge_port=free_port(), admin_port=free_port(), drain_seconds=5.0,
                        state_dir=tmp_path_factory.mktemp("two"), routing="round_robin", semcache=False)
    st = Stack(opts)
    asyncio.run(st.start())
    yield st
    st.stop()


async def test_killed_worker_costs_only_its_requests(two_workers):
    """SIGKILL the worker serving a stream: that stream ends with a clear
    UNAVAILABLE error; the next requests are served by the other worker."""
    edge = f"127.0.0.1:{two_workers.opts.edge_port}"
    survivors = [s for s in two_workers.services if s.kind == "worker" and s.child.alive]
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        call = stub.ChatStream(inference_pb2.ChatStreamRequest(messages=LONG, options=inference_pb2.RequestOptions(
            sampling=common_pb2.SamplingParams(max_tokens=1500, temperature=0.8))), timeout=120)
        first = await call.read()
        assert first.delta or first.token_count
        busy = [w for w in survivors if (await _load(w.grpc)).running > 0]
        assert len(busy) == 1
        busy[0].child.signal(signal.SIGKILL)
        rest = []
        while (resp := await call.read()) is not grpc.aio.EOF:
            rest.append(resp)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
        assert rest[-1].error.code == "UNAVAILABLE"
        assert "failed mid-stream" in rest[-1].error.message
        for _ in range(3):
            resp = await stub.Chat(inference_pb2.ChatRequest(messages=LONG[:1] + [common_pb2.ChatMessage(role="user", content="Hi")],
                                   options=inference_pb2.RequestOptions(sampling=common_pb2.SamplingParams(max_tokens=5))), timeout=60)
            assert resp.usage.completion_tokens >= 1
    status = subprocess.run([sys.executable, "-m", "llmfabric.cli.main", "status", "--state-dir", str(two_workers.state_dir)],
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 1
    assert "UNREACHABLE" in status.stdout


async def test_sigterm_drains_in_flight_streams(two_workers):
    """A worker told to stop finishes the stream it is serving, then exits 0.
    (Runs after the kill test, on the worker that survived it.)"""
    worker = next(s for s in two_workers.services if s.kind == "worker" and s.child.alive)
    async with grpc.aio.insecure_channel(worker.grpc) as ch:
        stub = worker_pb2_grpc.WorkerServiceStub(ch)
        req = common_pb2.TokenizedRequest(request_id="drain", model="smollm2-135m-instruct",
                                          prompt_token_ids=[1, 4093, 198, 19556, 30, 2, 198, 1, 520, 9531, 198],
                                          sampling=common_pb2.SamplingParams(max_tokens=60, temperature=0.8, top_p=1.0))
        call = stub.Generate(worker_pb2.GenerateRequest(request=req))
        chunks = [await call.read()]
        worker.child.signal(signal.SIGTERM)
        while (resp := await call.read()) is not grpc.aio.EOF:
            chunks.append(resp)
    assert chunks[-1].chunk.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert worker.child.proc.wait(15) == 0


def test_llmfabric_up_status_chat_and_ctrl_c(tmp_path):
    port, admin = free_port(), free_port()
    # no LLMFABRIC_API_KEYS: `up` makes a local key (under XDG_CONFIG_HOME, here a temp dir) and `chat` finds it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("LLMFABRIC_API_KEYS", None)
    up = subprocess.Popen([sys.executable, "-m", "llmfabric.cli.main", "up", "--port", str(port), "--admin-port", str(admin),
                           "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line or "failed" in line:
                break
        assert any("llmfabric is up" in line for line in lines), "".join(lines)
        assert any("curl" in line for line in lines) and any("grpcurl" in line for line in lines)
        pids = [s["pid"] for s in json.loads((tmp_path / "stack.json").read_text())["services"]]
        status = subprocess.run([sys.executable, "-m", "llmfabric.cli.main", "status", "--state-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") >= 5
        key_file = tmp_path / "config" / "llmfabric" / "api-keys"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = _first_key(key_file)
        assert any(key in line for line in lines), "the banner shows the local key"
        chat = subprocess.run([sys.executable, "-m", "llmfabric.cli.main", "chat", "--edge", f"127.0.0.1:{port}",
                               "--max-tokens", "8", "Say hi"], capture_output=True, text=True, timeout=60, env=env)
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
        anonymous = subprocess.run([sys.executable, "-m", "llmfabric.cli.main", "chat", "--edge", f"127.0.0.1:{port}",
                                    "--max-tokens", "8", "Say hi"], capture_output=True, text=True, timeout=60,
                                   env={**env, "XDG_CONFIG_HOME": str(tmp_path / "nokeys")})
        assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stderr
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
    for _ in range(50):
        alive = [p for p in pids if _alive(p)]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, f"orphans left running: {alive}"


def _first_key(path) -> str:
    from llmfabric.gateway.apikeys import load_api_keys_file

    return load_api_keys_file(path)[0].key


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is gone for our purposes
        return f.read().split()[2] != "Z"

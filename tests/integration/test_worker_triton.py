"""The worker's ``triton`` engine against a real tritonserver: ``python -m
llmfabric.tritonserve`` (PyTriton's bundled Triton serving the embedded
engine as a decoupled model with the vLLM backend's tensor names), then
``llmfabric up --engine triton`` through the Envoy edge.

Greedy decoding is deterministic for a request run alone, so the Triton path
is compared with the embedded engine run in this process on the same ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import grpc
import pytest

from llmfabric.cli.processes import Child, free_port, stop_all
from llmfabric.common.v1 import common_pb2
from llmfabric.convert import request_to_pb
from llmfabric.gateway.apikeys import generate_api_key
from llmfabric.models.catalog import ModelNotInstalled, default_model
from llmfabric.models.gguf import GgufModel
from llmfabric.runtime.errors import Unavailable
from llmfabric.structs import Finish, Sampling, ValidatedRequest
from llmfabric.worker.config import WorkerConfig
from llmfabric.worker.embedded import EmbeddedEngine
from llmfabric.worker.server import create_server
from llmfabric.worker.triton import TritonEngine
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

TIMEOUT = 120.0  # bound on any single wait: a hang fails, never blocks the run
CONTEXT = 512
ENGINE = {"n_threads": 1, "n_threads_batch": 1, "weights": "original"}  # same llama.cpp setup on both sides
SYSTEM = "You are a helpful assistant."
FINISH = {common_pb2.FINISH_REASON_STOP: Finish.STOP, common_pb2.FINISH_REASON_LENGTH: Finish.LENGTH}


def _chatml(user: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
            return resp.status == 200
    except OSError:
        return False


async def _eventually(predicate, what: str, polls: int = int(TIMEOUT * 5)) -> None:
    for _ in range(polls):
        if predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"never happened: {what}")


@dataclasses.dataclass
class TritonServe:
    child: Child
    grpc: str  # host:port of Triton's gRPC endpoint
    http: str  # host:port of Triton's HTTP endpoint

    def log_records(self) -> list[dict]:
        """Our JSON log lines (Triton's own lines, and any interleaving, skipped)."""
        out = []
        for line in self.child.log_path.read_text(errors="replace").splitlines():
            start = line.find('{"ts"')
            if start >= 0:
                try:
                    out.append(json.loads(line[start:]))
                except ValueError:
                    pass
        return out


@pytest.fixture(scope="module")
def vocab():
    try:
        model = GgufModel(default_model().path, vocab_only=True)
    except ModelNotInstalled as exc:  # pragma: no cover - the dev setup installs it
        pytest.skip(f"model not installed: {exc}")
    yield model
    model.close()


@pytest.fixture(scope="module")
def triton(tmp_path_factory) -> TritonServe:
    """One launcher for the module (the last test stops it with SIGTERM)."""
    if importlib.util.find_spec("pytriton") is None:
        pytest.fail("nvidia-pytriton is not installed: `pip install --no-deps nvidia-pytriton==0.7.0` "
                    "(its dependencies are in pyproject.toml; see the comment there)")
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    p = "LLMFABRIC_TRITONSERVE_"
    env = {f"{p}GRPC_PORT": str(grpc_port), f"{p}HTTP_PORT": str(http_port), f"{p}METRICS_PORT": str(metrics_port),
           f"{p}CONTEXT_LENGTH": str(CONTEXT), f"{p}CAPACITY": "2", f"{p}DRAIN_SECONDS": "3",
           **{f"{p}{k.upper()}": str(v) for k, v in ENGINE.items()}}
    log = tmp_path_factory.mktemp("tritonserve") / "tritonserve.log"
    child = Child("tritonserve", [sys.executable, "-m", "llmfabric.tritonserve"], log, env=env)
    child.start(dict(os.environ))
    server = TritonServe(child, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}")
    try:
        ready = f"http://{server.http}/v2/models/llmfabric_llm/ready"
        for _ in range(int(TIMEOUT * 5)):  # the launcher's "model ready" line, and Triton's own word
            assert child.alive, f"tritonserve exited during start:\n{child.log_tail(40)}"
            if any(r["msg"] == "model ready" for r in server.log_records()):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"tritonserve never logged 'model ready':\n{child.log_tail(40)}")
        assert _http_ok(f"http://{server.http}/v2/health/ready") and _http_ok(ready)
        yield server
    finally:
        stop_all([child], grace=30)


@pytest.fixture(scope="module")
async def worker(triton):
    """A worker with engine=triton, in this process; yields its WorkerService stub."""
    cfg = WorkerConfig(port=0, metrics_port=-1, engine="triton", triton_url=triton.grpc, context_length=CONTEXT,
                       capacity=2, request_timeout=TIMEOUT, startup_timeout=TIMEOUT)
    svc, port = await create_server(cfg)
    try:
        await svc.load()
        await svc.host.set_serving(True)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield svc, worker_pb2_grpc.WorkerServiceStub(channel)
    finally:
        await svc.host.server.stop(0)
        await svc.close()


@pytest.fixture(scope="module")
async def embedded():
    engine = EmbeddedEngine(default_model(), context_length=CONTEXT, capacity=1, **ENGINE)
    await engine.start()
    yield engine
    await engine.stop()


def _request(vocab, rid: str, prompt: str, **sampling) -> ValidatedRequest:
    ids = vocab.tokenize(prompt, add_special=False, parse_special=True)
    s = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 32, **sampling}
    return ValidatedRequest(request_id=rid, model="smollm2-135m-instruct", prompt_token_ids=tuple(ids),
                            sampling=Sampling(**s))


async def _via_worker(stub, req: ValidatedRequest) -> list:
    call = stub.Generate(worker_pb2.GenerateRequest(request=request_to_pb(req)), timeout=TIMEOUT)
    return [r.chunk async for r in call]


async def _direct(engine, req: ValidatedRequest) -> list:
    return [c async for c in engine.generate(req)]


async def test_greedy_answer_equals_the_embedded_engine(vocab, worker, embedded):
    _, stub = worker
    req = _request(vocab, "greedy-1", _chatml("What is the capital of France? Answer in one sentence."),
                   max_tokens=48)
    via_triton, direct = await _via_worker(stub, req), await _direct(embedded, req)
    text = "".join(c.text for c in via_triton)
    assert text and text == "".join(c.text for c in direct)
    last = via_triton[-1]
    assert FINISH[last.finish_reason] is direct[-1].finish
    assert last.usage.prompt_tokens == len(req.prompt_token_ids) == direct[-1].usage.prompt_tokens
    assert last.usage.completion_tokens == direct[-1].usage.completion_tokens
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in via_triton[:-1])
    assert len(via_triton) > 2, "the answer is streamed, one chunk per text delta"


async def test_special_tokens_and_multibyte_text_round_trip(vocab, worker, embedded):
    """The prompt crosses as text: special tokens and a character split over tokens come back as the same ids."""
    _, stub = worker
    req = _request(vocab, "utf8-1", _chatml("Répète: « café 😀 naïve »"), max_tokens=24)
    via_triton, direct = await _via_worker(stub, req), await _direct(embedded, req)
    assert via_triton[-1].usage.prompt_tokens == len(req.prompt_token_ids)
    assert "".join(c.text for c in via_triton) == "".join(c.text for c in direct)


async def test_max_tokens_finishes_with_length(vocab, worker):
    _, stub = worker
    req = _request(vocab, "length-1", _chatml("Write a long story about a dragon."), max_tokens=5)
    chunks = await _via_worker(stub, req)
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 5


async def test_stop_sequence_cuts_the_answer(vocab, worker, embedded):
    _, stub = worker
    prompt = _chatml("What is the capital of France? Answer in one sentence.")
    full = "".join(c.text for c in await _direct(embedded, _request(vocab, "full", prompt, max_tokens=48)))
    words = full.split()
    assert len(words) >= 3, full
    stop = words[len(words) // 2]
    req = _request(vocab, "stop-1", prompt, max_tokens=48, stop=(stop,))
    via_triton, direct = await _via_worker(stub, req), await _direct(embedded, req)
    text = "".join(c.text for c in via_triton)
    assert text == full[: full.find(stop)] == "".join(c.text for c in direct)
    assert via_triton[-1].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_seeded_sampling_is_repeatable(vocab, worker):
    _, stub = worker
    req = _request(vocab, "seed-1", _chatml("Tell me a fun fact."), temperature=0.9, top_p=0.95, top_k=40,
                   seed=1234, max_tokens=20)
    first, second = await _via_worker(stub, req), await _via_worker(stub, dataclasses.replace(req, request_id="seed-2"))
    assert "".join(c.text for c in first) == "".join(c.text for c in second)


async def test_cancelling_the_call_stops_generation_in_triton(vocab, worker, triton):
    svc, stub = worker
    req = _request(vocab, "cancel-1", "1, 2, 3, 4, 5, 6,", max_tokens=400)
    call = stub.Generate(worker_pb2.GenerateRequest(request=request_to_pb(req)), timeout=TIMEOUT)
    for _ in range(3):
        assert (await call.read()).chunk.text is not None
    assert svc.engine.load().running == 1
    call.cancel()

    def stopped() -> list[dict]:
        return [r for r in triton.log_records()
                if r["msg"].startswith("request cancelled by the client") and r.get("request") == "cancel-1"]

    await _eventually(lambda: bool(stopped()), "the launcher stops the engine for the cancelled request")
    assert 3 <= stopped()[0]["generated_tokens"] < 400
    await _eventually(lambda: svc.engine.load().running == 0, "the worker forgets the request")
    after = await _via_worker(stub, _request(vocab, "after-cancel", _chatml("Say hi."), max_tokens=8))
    assert after[-1].finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)


def _infer_direct(url: str, inputs: dict[str, object], model: str = "llmfabric_llm") -> list[dict]:
    """One request on a raw tritonclient stream, as any vLLM-backend client sends it: the responses' outputs
    (plus "final"), or [{"error": message}]."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    tensors = []
    for name, value in inputs.items():
        kind = "BYTES" if isinstance(value, bytes) else "BOOL"
        tensors.append(grpcclient.InferInput(name, [1], kind))
        tensors[-1].set_data_from_numpy(np.array([value], dtype=np.object_ if kind == "BYTES" else np.bool_))
    out: list[dict] = []
    try:
        client.async_stream_infer(model, tensors, request_id="direct", enable_empty_final_response=True)
        while True:
            result, error = got.get(timeout=TIMEOUT)
            if error is not None:
                return [{"error": error.message()}]
            resp = result.get_response()
            out.append({o.name: result.as_numpy(o.name).tolist() for o in resp.outputs})
            out[-1]["final"] = resp.parameters["triton_final_response"].bool_param
            if out[-1]["final"]:
                return out
    finally:
        client.stop_stream()
        client.close()


async def test_vllm_backend_protocol_directly(vocab, triton):
    """What a client of Triton's vLLM backend sees: deltas, "None" until the finish reason, per-response
    token counts; without ``stream`` one response with the prompt first; bad sampling parameters refused."""
    prompt = _chatml("What is the capital of France?").encode()
    flags = {"return_finish_reason": True, "return_num_input_tokens": True, "return_num_output_tokens": True}
    params = json.dumps({"temperature": 0, "max_tokens": 12, "top_k": -1, "seed": None}).encode()
    streamed = await asyncio.to_thread(_infer_direct, triton.grpc, {"text_input": prompt, "stream": True,
                                                                    "sampling_parameters": params, **flags})
    data = [r for r in streamed if "text_output" in r]
    assert len(data) > 1 and all(r["finish_reason"] == [b"None"] for r in data[:-1])
    assert data[-1]["finish_reason"][0] in (b"stop", b"length")
    assert all(r["num_input_tokens"] == [len(vocab.tokenize(prompt.decode(), add_special=False, parse_special=True))]
               for r in data)
    assert 1 <= sum(r["num_output_tokens"][0] for r in data) <= 12
    answer = b"".join(r["text_output"][0] for r in data)
    whole = await asyncio.to_thread(_infer_direct, triton.grpc, {"text_input": prompt, "sampling_parameters": params})
    texts = [r["text_output"][0] for r in whole if "text_output" in r]
    assert texts == [prompt + answer], "not streaming: one response, the prompt first (exclude_input_in_output off)"
    assert "finish_reason" not in whole[0], "additional outputs only when asked for"
    bad = json.dumps({"max_tokens": 4, "best_of": 3}).encode()
    refused = await asyncio.to_thread(_infer_direct, triton.grpc, {"text_input": prompt, "stream": True,
                                                                   "sampling_parameters": bad})
    assert "sampling_parameters.best_of" in refused[0]["error"]
    refused = await asyncio.to_thread(_infer_direct, triton.grpc, {"text_input": prompt, "stream": True,
                                                                   "exclude_input_in_output": False})
    assert "exclude_input_in_output" in refused[0]["error"]


def test_bad_setting_fails_fast_naming_the_variable():
    env = {**os.environ, "LLMFABRIC_TRITONSERVE_GRPC_PORT": "not-a-port"}
    done = subprocess.run([sys.executable, "-m", "llmfabric.tritonserve"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "LLMFABRIC_TRITONSERVE_GRPC_PORT" in done.stderr


async def test_bad_prompt_ids_are_invalid_argument(worker):
    _, stub = worker
    req = ValidatedRequest(request_id="bad-ids", model="m", prompt_token_ids=(1, 10**7),
                           sampling=Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=4))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _via_worker(stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vocabulary" in err.value.details()


async def test_unknown_model_fails_start_cleanly(triton):
    cfg = WorkerConfig(port=0, metrics_port=-1, engine="triton", triton_url=triton.grpc,
                       triton_model="no_such_model", startup_timeout=2.0)
    svc, _ = await create_server(cfg)
    try:
        with pytest.raises(Unavailable) as err:
            await svc.load()
        assert "no_such_model" in err.value.message and "unknown model" in err.value.message
    finally:
        await svc.host.server.stop(0)
        await svc.close()


async def test_server_down_fails_start_cleanly():
    url = f"127.0.0.1:{free_port()}"
    engine = TritonEngine(WorkerConfig(engine="triton", triton_url=url, startup_timeout=2.0))
    with pytest.raises(Unavailable) as err:
        await engine.start()
    assert url in err.value.message


async def test_generate_errors_are_clean_when_triton_goes_away_or_lacks_the_model(vocab, triton):
    """An engine started against the live server, then pointed elsewhere: each request fails fast and clearly."""
    cfg = WorkerConfig(engine="triton", triton_url=triton.grpc, context_length=CONTEXT, request_timeout=TIMEOUT)
    engine = TritonEngine(cfg)
    await engine.start()
    try:
        req = _request(vocab, "err-1", _chatml("Say hi."), max_tokens=4)
        engine.cfg = dataclasses.replace(cfg, triton_model="no_such_model")
        with pytest.raises(Unavailable) as err:
            await _direct(engine, req)
        assert "unknown model" in err.value.message
        engine.cfg = dataclasses.replace(cfg, triton_url=f"127.0.0.1:{free_port()}")
        with pytest.raises(Unavailable) as err:
            await _direct(engine, req)
        assert "before the first token" in err.value.message and engine.cfg.triton_url in err.value.message
        assert engine.load().running == 0
    finally:
        await engine.stop()


def test_sigterm_stops_the_launcher_and_triton(triton):
    """Runs after the other tests of the shared launcher: it stops it."""
    grpc_port = triton.grpc.rsplit(":", 1)[1]
    assert _tritonservers(grpc_port), "tritonserver runs as the launcher's child"
    os.kill(triton.child.proc.pid, signal.SIGTERM)  # the launcher alone, not its process group
    assert triton.child.proc.wait(60) == 0, triton.child.log_tail(40)
    assert not _tritonservers(grpc_port), "triton.stop() stopped tritonserver"
    assert any(r["msg"] == "stopped" for r in triton.log_records())


def _tritonservers(grpc_port: str) -> list[int]:
    """Live tritonserver processes listening on ``grpc_port``."""
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if argv and argv[0].endswith(b"tritonserver") and grpc_port.encode() in argv and state != "Z":
            pids.append(int(proc.name))
    return pids


async def test_llmfabric_up_engine_triton_chats_through_envoy(tmp_path):
    """The real launcher, in its own process (forking service processes from this one, which runs gRPC
    threads, is not safe): `llmfabric up --engine triton`, a chat through the edge, Ctrl-C, nothing left."""
    port, admin = free_port(), free_port()
    key = generate_api_key()
    argv = [sys.executable, "-m", "llmfabric.cli.main", "up", "--engine", "triton", "--port", str(port),
            "--admin-port", str(admin), "--state-dir", str(tmp_path), "--capacity", "2",
            "--context-length", str(CONTEXT)]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "LLMFABRIC_API_KEYS": f"{key}:triton-test"})
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line or "failed" in line:
                break
        assert any("llmfabric is up" in line for line in lines), "".join(lines)
        state = json.loads((tmp_path / "stack.json").read_text())
        assert [t["name"] for t in state["triton"]] == ["triton-0"]
        assert "tritonserve" not in [s["kind"] for s in state["services"]], "`llmfabric status` checks only these"
        pids = [s["pid"] for s in state["services"] + state["triton"]]
        triton_grpc = state["triton"][0]["grpc"].rsplit(":", 1)[1]
        assert _tritonservers(triton_grpc)
        payload = {"model": "smollm2-135m-instruct", "max_tokens": 16, "temperature": 0,
                   "messages": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "What is the capital of France?"}]}
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {key}"}) as http:
            async with http.post("/v1/chat/completions", json=payload) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            async with http.post("/v1/chat/completions", json={**payload, "stream": True}) as r:
                assert r.status == 200
                raw = (await r.read()).decode()
        answer = body["choices"][0]["message"]["content"]
        assert "Paris" in answer
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 16
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == answer
        up.send_signal(signal.SIGINT)
        assert up.wait(90) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
    await _eventually(lambda: not [p for p in pids if _alive(p)], "every service process exits", polls=100)
    assert not _tritonservers(triton_grpc), "no tritonserver outlives the stack"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is gone for our purposes
            return f.read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False

"""The worker's ``sglang`` engine through the worker's real gRPC API, against
the in-process SGLang stand-in (tests/fakes/sglang_server.py)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from sglang_server import WORDS, expected

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import Unavailable
from llmfabric.worker.v1 import worker_pb2

PROMPT = (11, 22, 33, 44, 55)
TIMEOUT = 10.0  # seconds any single RPC may take before the test fails instead of hanging


def request(rid: str = "r1", prompt=PROMPT, max_tokens: int = 8, **sampling) -> worker_pb2.GenerateRequest:
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, **sampling}
    params = common_pb2.SamplingParams(max_tokens=max_tokens, **sampling)
    tokenized = common_pb2.TokenizedRequest(request_id=rid, model="m", prompt_token_ids=list(prompt), sampling=params)
    return worker_pb2.GenerateRequest(request=tokenized)


async def generate(w, req) -> list[common_pb2.TokenChunk]:
    chunks = []
    await generate_into(w, req, chunks)
    return chunks


async def generate_error(w, req) -> tuple[grpc.aio.AioRpcError, list]:
    chunks = []
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await generate_into(w, req, chunks)
    return exc_info.value, chunks


async def generate_into(w, req, chunks: list) -> None:
    async def read():
        async for resp in w.stub.Generate(req, timeout=TIMEOUT):
            chunks.append(resp.chunk)

    await asyncio.wait_for(read(), TIMEOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ streaming


async def test_deltas_concatenate_to_the_servers_text(sglang, worker):
    fake = await sglang()
    w = await worker(fake)
    chunks = await generate(w, request(max_tokens=12))
    text, ids, _ = expected(PROMPT, 12)
    assert "".join(c.text for c in chunks) == text
    assert [t for c in chunks for t in c.token_ids] == ids
    assert len(chunks) == 12  # one chunk per streamed line, never an empty one
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 12)


async def test_multibyte_words_arrive_whole(sglang, worker):
    fake = await sglang()
    w = await worker(fake)
    chunks = await generate(w, request(max_tokens=40))
    for c in chunks:
        assert c.text == "" or c.text[1:] in WORDS  # every delta is one whole word, "🙂" and "日本" included
    assert any(not c.text.isascii() for c in chunks)


async def test_lines_split_mid_character_reassemble(sglang, worker):
    fake = await sglang()
    fake.write_size = 3  # every SSE line arrives in 3-byte pieces, splitting "日本" and "🙂"
    w = await worker(fake)
    chunks = await generate(w, request(max_tokens=30))
    text, ids, _ = expected(PROMPT, 30)
    assert "".join(c.text for c in chunks) == text
    assert not text.isascii()
    assert [t for c in chunks for t in c.token_ids] == ids


async def test_lines_longer_than_client_buffers(sglang, worker):
    fake = await sglang()
    fake.pad_bytes = 600_000  # aiohttp's own line reader gives up beyond 512 KiB
    w = await worker(fake)
    chunks = await generate(w, request(max_tokens=3))
    assert "".join(c.text for c in chunks) == expected(PROMPT, 3)[0]


async def test_incremental_streaming_server(sglang, worker):
    fake = await sglang(incremental=True)
    w = await worker(fake)
    chunks = await generate(w, request(max_tokens=9))
    text, ids, _ = expected(PROMPT, 9)
    assert "".join(c.text for c in chunks) == text
    assert [t for c in chunks for t in c.token_ids] == ids


async def test_stop_sequence_finishes_with_stop(sglang, worker):
    fake = await sglang()
    w = await worker(fake)
    full, _, _ = expected(PROMPT, 12)
    stop = full.split(" ")[4]  # the 4th word; the text ends before it
    chunks = await generate(w, request(max_tokens=12, stop=[" " + stop]))
    text, ids, reason = expected(PROMPT, 12, stop=(" " + stop,))
    assert reason["type"] == "stop"
    assert "".join(c.text for c in chunks) == text
    assert len(text) < len(full)
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == len(ids)


async def test_eos_finishes_with_stop(sglang, worker):
    fake = await sglang()
    _, ids, _ = expected(PROMPT, 6)
    fake.eos_token_id = ids[3]
    w = await worker(fake)
    chunks = await generate(w, request(max_tokens=6))
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == 4


async def test_single_token_answer(sglang, worker):
    fake = await sglang()
    w = await worker(fake)
    chunks = await generate(w, request(max_tokens=1))
    assert len(chunks) == 1
    assert chunks[0].text == expected(PROMPT, 1)[0]
    assert chunks[0].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_repeated_prompt_reports_cached_tokens(sglang, worker):
    fake = await sglang()
    w = await worker(fake)
    first = await generate(w, request("a", max_tokens=4))
    second = await generate(w, request("b", max_tokens=4))
    assert first[-1].usage.cached_tokens == 0
    assert second[-1].usage.cached_tokens == len(PROMPT) - 1  # all but the last prompt token
    ld = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=TIMEOUT)
    assert ld.cached_tokens_total >= len(PROMPT) - 1


async def test_request_uses_sglangs_native_fields(sglang, worker):
    fake = await sglang()
    w = await worker(fake)
    await generate(w, request("rid-1", max_tokens=5, temperature=0.5, stop=["x", "yz"], repetition_penalty=1.2))
    await generate(w, request("rid-2", max_tokens=3, top_k=40, seed=1234))
    first, second = fake.requests
    assert first["input_ids"] == list(PROMPT)
    assert first["stream"] is True
    assert first["rid"] == "rid-1"
    assert first["sampling_params"] == {
        "max_new_tokens": 5, "temperature": 0.5, "top_p": 1.0, "top_k": -1, "stop": ["x", "yz"],
        "repetition_penalty": pytest.approx(1.2),
    }
    assert second["sampling_params"]["top_k"] == 40
    assert second["sampling_params"]["sampling_seed"] == 1234


async def test_concurrent_streams_do_not_mix(sglang, worker):
    fake = await sglang()
    w = await worker(fake)
    prompts = [(1, 2, 3), (4, 5, 6, 7), (8, 9)]
    results = await asyncio.gather(*(generate(w, request(f"c{i}", p, max_tokens=7)) for i, p in enumerate(prompts)))
    for prompt, chunks in zip(prompts, results):
        assert "".join(c.text for c in chunks) == expected(prompt, 7)[0]


# ------------------------------------------------------------------ info / load / flush


async def test_get_info_comes_from_the_server(sglang, worker):
    fake = await sglang(max_running_requests=24)
    w = await worker(fake, context_length=2048, capacity=4)
    info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=TIMEOUT)
    assert info.engine == "sglang"
    assert info.model == "Fake-Model-7B-Instruct"  # the last part of model_path
    assert info.capacity == 24  # SGLang's max_running_requests, not the config's
    assert info.context_length == 2048  # the config's: smaller than SGLang's 4096


async def test_get_info_takes_the_smaller_server_window(sglang, worker):
    fake = await sglang(context_length=512, max_running_requests=None)
    w = await worker(fake, context_length=2048, capacity=4, model_name="served-name")
    info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=TIMEOUT)
    assert info.context_length == 512
    assert info.model == "served-name"
    assert info.capacity == 48  # internal_states' effective_max_running_requests_per_dp


async def test_prompt_beyond_the_window_is_rejected_before_sglang(sglang, worker):
    fake = await sglang(context_length=64)
    w = await worker(fake, context_length=2048)
    err, _ = await generate_error(w, request(prompt=tuple(range(60)), max_tokens=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.requests == []


async def test_older_server_info_endpoints(sglang, worker):
    fake = await sglang(legacy=True, max_running_requests=12)
    w = await worker(fake, capacity=4)
    info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=TIMEOUT)
    assert (info.model, info.capacity) == ("Fake-Model-7B-Instruct", 12)
    chunks = await generate(w, request(max_tokens=5))
    assert "".join(c.text for c in chunks) == expected(PROMPT, 5)[0]


async def test_older_server_with_incremental_stream_output(sglang, worker):
    fake = await sglang(legacy=True, incremental=True)
    w = await worker(fake)
    chunks = await generate(w, request(max_tokens=6))
    assert "".join(c.text for c in chunks) == expected(PROMPT, 6)[0]


async def test_get_load_reflects_sglang_metrics(sglang, worker, wait_until):
    fake = await sglang(max_total_num_tokens=4000, max_running_requests=8)
    fake.metrics_override = {
        "sglang:num_running_reqs": 3, "sglang:num_queue_reqs": 2, "sglang:num_used_tokens": 1000,
        "sglang:token_usage": 0.25, "sglang:prompt_tokens_total": 5000, "sglang:cached_tokens_total": 1200,
    }
    w = await worker(fake)
    ld = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=TIMEOUT)
    assert (ld.running, ld.waiting, ld.capacity) == (3, 2, 8)
    assert (ld.kv_used, ld.kv_free) == (1000, 3000)
    assert (ld.prompt_tokens_total, ld.cached_tokens_total) == (5000, 1200)
    fake.metrics_override["sglang:num_queue_reqs"] = 7  # picked up by the background poll

    async def updated():
        return (await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=TIMEOUT)).waiting == 7

    await wait_until(updated, what="GetLoad to show the new queue length")


async def test_get_load_without_metrics_counts_own_requests(sglang, worker):
    fake = await sglang(metrics_enabled=False, max_total_num_tokens=4000)
    w = await worker(fake)
    await generate(w, request("a", max_tokens=3))
    await generate(w, request("b", max_tokens=3))
    ld = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=TIMEOUT)
    assert (ld.running, ld.waiting, ld.kv_used, ld.kv_free) == (0, 0, 0, 4000)
    assert ld.prompt_tokens_total == 2 * len(PROMPT)
    assert ld.cached_tokens_total == len(PROMPT) - 1


async def test_get_load_counts_streams_in_flight(sglang, worker, wait_until):
    fake = await sglang(metrics_enabled=False)
    fake.hold = asyncio.Event()
    w = await worker(fake)
    call = w.stub.Generate(request("held", max_tokens=5), timeout=TIMEOUT)
    await asyncio.wait_for(call.read(), TIMEOUT)  # the first token is out; the stream is held
    ld = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=TIMEOUT)
    assert (ld.running, ld.waiting) == (1, 0)
    fake.hold.set()
    rest = []
    while (resp := await asyncio.wait_for(call.read(), TIMEOUT)) is not grpc.aio.EOF:
        rest.append(resp)
    assert rest[-1].chunk.finish_reason == common_pb2.FINISH_REASON_LENGTH
    ld = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=TIMEOUT)
    assert (ld.running, ld.waiting) == (0, 0)


async def test_get_load_unavailable_when_sglang_goes_away(sglang, worker, wait_until):
    fake = await sglang()
    w = await worker(fake)
    await fake.close()

    async def unavailable():
        try:
            await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=TIMEOUT)
        except grpc.aio.AioRpcError as err:
            return err.code() == grpc.StatusCode.UNAVAILABLE and "SGLang" in err.details()
        return False

    await wait_until(unavailable, what="GetLoad to report UNAVAILABLE")


async def test_flush_cache_reaches_sglang(sglang, worker):
    fake = await sglang()
    w = await worker(fake)
    await generate(w, request("a", max_tokens=3))
    resp = await w.stub.FlushCache(worker_pb2.FlushCacheRequest(), timeout=TIMEOUT)
    assert resp.tokens_flushed == 0  # SGLang does not report a count
    assert fake.flushes == 1
    again = await generate(w, request("b", max_tokens=3))
    assert again[-1].usage.cached_tokens == 0  # the prefix cache is empty again


async def test_flush_cache_refused_is_unavailable(sglang, worker):
    fake = await sglang()
    fake.flush_ok = False
    w = await worker(fake)
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await w.stub.FlushCache(worker_pb2.FlushCacheRequest(), timeout=TIMEOUT)
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "SGLang refused /flush_cache (HTTP 400)" in exc_info.value.details()
    assert "running or waiting requests" in exc_info.value.details()


# ------------------------------------------------------------------ cancellation


async def test_cancel_aborts_upstream(sglang, worker, wait_until):
    fake = await sglang()
    fake.hold = asyncio.Event()
    w = await worker(fake)
    call = w.stub.Generate(request("to-cancel", max_tokens=50), timeout=TIMEOUT)
    first = await asyncio.wait_for(call.read(), TIMEOUT)
    assert first.chunk.text
    call.cancel()
    await wait_until(lambda: "to-cancel" in fake.aborted, what="/abort_request with the rid")
    fake.hold.set()
    await wait_until(lambda: "to-cancel" in fake.disconnected, what="the stream to be closed")
    assert "to-cancel" not in fake.finished

    async def idle():
        ld = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=TIMEOUT)
        return (ld.running, ld.waiting) == (0, 0)

    await wait_until(idle, what="the worker to forget the stream")


async def test_deadline_aborts_upstream(sglang, worker, wait_until):
    fake = await sglang()
    fake.hold = asyncio.Event()
    w = await worker(fake)
    call = w.stub.Generate(request("deadline", max_tokens=50), timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        while await asyncio.wait_for(call.read(), TIMEOUT) is not grpc.aio.EOF:
            pass
    assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: "deadline" in fake.aborted, what="/abort_request with the rid")


async def test_upstream_timeout_is_deadline_exceeded_and_aborts(sglang, worker, wait_until):
    fake = await sglang()
    fake.hold = asyncio.Event()
    w = await worker(fake, request_timeout=0.5)
    err, chunks = await generate_error(w, request("slow", max_tokens=50))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "SGLang did not finish within 0.5s" in err.details()
    assert len(chunks) == 1
    await wait_until(lambda: "slow" in fake.aborted, what="/abort_request with the rid")


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    ("fail", "fail_after", "code", "words"),
    [
        ("http_500", 0, grpc.StatusCode.UNAVAILABLE, "HTTP 500: Internal Server Error"),
        ("http_503", 0, grpc.StatusCode.UNAVAILABLE, "HTTP 503: fake SGLang failure"),
        ("http_429", 0, grpc.StatusCode.RESOURCE_EXHAUSTED, "HTTP 429"),
        ("http_400", 0, grpc.StatusCode.INVALID_ARGUMENT, "HTTP 400"),
        ("drop", 0, grpc.StatusCode.UNAVAILABLE, "connection failed before the first token"),
        ("close", 0, grpc.StatusCode.UNAVAILABLE, "connection failed before the first token"),
        ("close", 2, grpc.StatusCode.UNAVAILABLE, "connection failed mid-stream"),
        ("abort_503", 0, grpc.StatusCode.UNAVAILABLE, "aborted the request: Request running timeout reached."),
        ("abort_503", 3, grpc.StatusCode.UNAVAILABLE, "aborted the request: Request running timeout reached."),
        ("no_finish", 2, grpc.StatusCode.UNAVAILABLE, "stream ended without a finish_reason"),
        ("error_line", 0, grpc.StatusCode.INVALID_ARGUMENT, "rejected the request: fake SGLang failure (ValueError)"),
    ],
)
async def test_failure_gives_a_clean_error(sglang, worker, fail, fail_after, code, words):
    fake = await sglang()
    fake.fail, fake.fail_after = fail, fail_after
    w = await worker(fake)
    err, chunks = await generate_error(w, request("f", max_tokens=10))
    assert err.code() == code
    assert "SGLang" in err.details()
    assert words in err.details()
    assert len(chunks) == fail_after
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks)
    fake.fail = None  # the worker still serves afterwards
    ok = await generate(w, request("after", max_tokens=3))
    assert ok[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_sglang_validation_error_is_invalid_argument(sglang, worker):
    fake = await sglang(context_length=None, model_context=4096)
    w = await worker(fake, context_length=8192)  # the server's smaller window (max_req_input_len + 1) wins
    info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=TIMEOUT)
    assert info.context_length == 4096
    fake.context_length = 16  # SGLang restarted with a smaller --context-length behind the worker's back
    err, chunks = await generate_error(w, request(max_tokens=20))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("SGLang rejected the request: Requested token count exceeds")
    assert chunks == []


async def test_aborted_by_someone_else_is_unavailable(sglang, worker, wait_until):
    fake = await sglang()
    fake.hold = asyncio.Event()
    w = await worker(fake)
    call = w.stub.Generate(request("victim", max_tokens=20), timeout=TIMEOUT)
    await asyncio.wait_for(call.read(), TIMEOUT)
    fake._abort_flags.add("victim")  # e.g. another client's /abort_request or a weight update
    fake.hold.set()
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        while await asyncio.wait_for(call.read(), TIMEOUT) is not grpc.aio.EOF:
            pass
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "SGLang aborted the request: Aborted" in exc_info.value.details()


# ------------------------------------------------------------------ startup


async def test_server_not_up_at_start_is_a_clear_error(worker):
    url = f"http://127.0.0.1:{free_port()}"
    w = await worker(url, load=False, startup_timeout=0.5)
    with pytest.raises(Unavailable) as exc_info:
        await asyncio.wait_for(w.svc.load(), TIMEOUT)
    message = exc_info.value.message
    assert f"SGLang at {url} did not become healthy within 0.5s" in message
    assert "GET /health" in message


async def test_unhealthy_server_at_start_is_a_clear_error(sglang, worker):
    fake = await sglang()
    fake.healthy = False
    w = await worker(fake, load=False, startup_timeout=0.5)
    with pytest.raises(Unavailable) as exc_info:
        await asyncio.wait_for(w.svc.load(), TIMEOUT)
    assert "last GET /health: HTTP 503" in exc_info.value.message
    assert fake.health_checks >= 1


async def test_waits_for_the_server_to_become_healthy(sglang, worker, wait_until):
    fake = await sglang()
    fake.healthy = False
    w = await worker(fake, load=False, request_timeout=TIMEOUT)
    loading = asyncio.create_task(w.svc.load())
    await wait_until(lambda: fake.health_checks >= 2, what="health probes")
    assert not loading.done()
    fake.healthy = True
    await asyncio.wait_for(loading, TIMEOUT)
    await w.svc.host.set_serving(True)
    chunks = await generate(w, request(max_tokens=2))
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH

"""frontend.openai_api over aiohttp's test server with a fake pipeline:
response shapes (JSON and SSE), error status mapping, and streams that fail
before or after their first chunk."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from llmfabric.frontend.openai_api import OpenAIApi, error_body
from llmfabric.frontend.answer_cache import CacheOutcome
from llmfabric.frontend.pipeline import Answer, GenerationInput, ModelCard
from llmfabric.runtime.errors import (
    Cancelled,
    DeadlineExceeded,
    FabricError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmfabric.structs import Finish, TokenChunk, Usage

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Say hello"}]


class Wait:
    """A script step: block until the event is set (never, unless told)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()


class FakePipeline:
    """``run`` plays ``script``: TokenChunks are yielded, exceptions raised."""

    def __init__(self) -> None:
        self.models = [ModelCard(MODEL, 2048, 1_700_000_000)]
        self.script: list = []
        self.inputs: list[GenerationInput] = []
        self.closed = asyncio.Event()  # set when a run's generator is finalized
        self.cancelled = False
        self.cache_outcome = CacheOutcome()

    async def start(self, inp: GenerationInput, deadline: float | None = None) -> Answer:
        return Answer(None, self.cache_outcome, self.run(inp, deadline))

    async def run(self, inp: GenerationInput, deadline: float | None = None):
        self.inputs.append(inp)
        try:
            for step in self.script:
                if isinstance(step, BaseException):
                    raise step
                if isinstance(step, Wait):
                    await step.event.wait()
                    continue
                yield step
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled = True
            raise
        finally:
            self.closed.set()


def answer(*texts: str, finish: Finish = Finish.STOP, usage: Usage | None = None) -> list[TokenChunk]:
    usage = usage or Usage(prompt_tokens=12, completion_tokens=len(texts), cached_tokens=5)
    chunks = [TokenChunk(token_ids=(100 + i,), text=t) for i, t in enumerate(texts)]
    chunks.append(TokenChunk(token_ids=(), text="", finish=finish, usage=usage))
    return chunks


@pytest.fixture(scope="module")
async def setup():
    pipeline = FakePipeline()
    client = TestClient(TestServer(OpenAIApi(pipeline).app()))
    await client.start_server()
    yield client, pipeline
    await client.close()


@pytest.fixture
def client(setup):
    client, pipeline = setup
    pipeline.script = []
    pipeline.inputs.clear()
    pipeline.closed = asyncio.Event()
    pipeline.cancelled = False
    pipeline.models = [ModelCard(MODEL, 2048, 1_700_000_000)]
    return client


@pytest.fixture
def pipeline(setup) -> FakePipeline:
    return setup[1]


def sse_events(raw: str) -> list:
    """Parsed ``data:`` payloads ("[DONE]" kept as a string)."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def post(client, path, body, **kw):
    return await client.post(path, json=body, **kw)


# ------------------------------------------------------------ non-streaming


async def test_chat_json_shape(client, pipeline):
    pipeline.script = answer("Hel", "lo", "!", usage=Usage(prompt_tokens=12, completion_tokens=3, cached_tokens=5))
    resp = await post(client, CHAT, {"model": "smollm2", "messages": USER}, headers={"x-request-id": "req-abc"})
    assert resp.status == 200
    assert resp.headers["x-request-id"] == "req-abc"
    body = await resp.json()
    assert body["id"] == "chatcmpl-req-abc"
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop", "logprobs": None}
    ]
    assert body["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 5},
    }


async def test_chat_input_reaches_pipeline(client, pipeline):
    pipeline.script = answer("ok")
    await post(
        client, CHAT, {"model": "smollm2", "messages": USER, "temperature": 0.2, "max_tokens": 5},
        headers={"x-request-id": "rid-9", "x-tenant-id": "acme"},
    )
    (inp,) = pipeline.inputs
    assert inp.request_id == "rid-9"
    assert inp.tenant_id == "acme"
    assert inp.model == "smollm2"
    assert inp.messages == (("user", "Say hello"),)
    assert inp.sampling.max_tokens == 5


async def test_request_id_generated(client, pipeline):
    pipeline.script = answer("x")
    resp = await post(client, CHAT, {"messages": USER})
    rid = resp.headers["x-request-id"]
    assert len(rid) == 32
    assert (await resp.json())["id"] == "chatcmpl-" + rid
    assert pipeline.inputs[0].request_id == rid


async def test_completion_json_shape(client, pipeline):
    pipeline.script = answer("Once", " upon", finish=Finish.LENGTH)
    resp = await post(client, COMPLETIONS, {"prompt": "Tell me", "max_tokens": 2}, headers={"x-request-id": "c1"})
    assert resp.status == 200
    body = await resp.json()
    assert body["id"] == "cmpl-c1"
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "Once upon", "finish_reason": "length", "logprobs": None}]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert pipeline.inputs[0].prompt == "Tell me" and pipeline.inputs[0].messages is None


async def test_pipeline_closed_after_non_stream(client, pipeline):
    pipeline.script = answer("a")
    await post(client, CHAT, {"messages": USER})
    assert pipeline.closed.is_set()


async def test_stream_without_final_chunk_is_server_error(client, pipeline):
    pipeline.script = [TokenChunk((1,), "partial")]
    resp = await post(client, CHAT, {"messages": USER})
    assert resp.status == 500
    err = (await resp.json())["error"]
    assert err["type"] == "server_error"


# ------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "error,status,etype,code,param",
    [
        (InvalidArgument("sampling.temperature", "must be between 0 and 2, got 3"), 400, "invalid_request_error",
         None, "temperature"),
        (InvalidArgument("messages[0].role", "must be one of system, user, assistant"), 400,
         "invalid_request_error", None, "messages[0].role"),
        (NotFound("model 'gpt-4' does not exist", field="model"), 404, "invalid_request_error", "model_not_found",
         "model"),
        (ResourceExhausted("queue is full", retry_after_ms=3000), 429, "rate_limit_error", "rate_limit_exceeded",
         None),
        (Unavailable("no workers"), 503, "service_unavailable", "service_unavailable", None),
        (DeadlineExceeded("deadline passed"), 504, "timeout", "timeout", None),
        (Cancelled("cancelled"), 499, "cancelled", "cancelled", None),
        (FabricError("engine exploded"), 500, "server_error", "internal_error", None),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_error_mapping(client, pipeline, error, status, etype, code, param, stream):
    pipeline.script = [error]
    resp = await post(client, CHAT, {"messages": USER, "stream": stream})
    assert resp.status == status
    assert resp.content_type == "application/json"  # never a 200 SSE for an error before the first chunk
    err = (await resp.json())["error"]
    assert err["type"] == etype
    assert err["code"] == code
    assert err["param"] == param
    assert "sampling." not in err["message"]
    if isinstance(error, InvalidArgument):
        assert err["message"].startswith(param + ":")


async def test_invalid_argument_message_strips_prefix(client, pipeline):
    pipeline.script = [InvalidArgument("sampling.max_tokens", "12 prompt tokens + 5000 max_tokens exceeds the window")]
    resp = await post(client, COMPLETIONS, {"prompt": "x", "max_tokens": 5000})
    err = (await resp.json())["error"]
    assert err["param"] == "max_tokens"
    assert err["message"] == "max_tokens: 12 prompt tokens + 5000 max_tokens exceeds the window"


@pytest.mark.parametrize("ms,header", [(3000, "3"), (1000, "1"), (200, "1"), (60_000, "60")])
async def test_retry_after_header(client, pipeline, ms, header):
    pipeline.script = [ResourceExhausted("busy", retry_after_ms=ms)]
    resp = await post(client, CHAT, {"messages": USER})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == header


async def test_no_retry_after_for_other_errors(client, pipeline):
    pipeline.script = [Unavailable("down")]
    resp = await post(client, CHAT, {"messages": USER})
    assert "Retry-After" not in resp.headers


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe\x00", b'{"messages": [}'])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_malformed_json(client, pipeline, raw, path):
    resp = await client.post(path, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == "body"
    assert err["type"] == "invalid_request_error"
    assert "JSON" in err["message"]
    assert pipeline.inputs == []


@pytest.mark.parametrize(
    "body,param",
    [
        ([1, 2], "body"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "max_tokens": 1.5}, "max_tokens"),
        ({"messages": USER, "stream": "yes"}, "stream"),
    ],
)
async def test_parse_errors_are_400_with_param(client, pipeline, body, param):
    resp = await post(client, CHAT, body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
    assert pipeline.inputs == []


async def test_parse_error_on_completions(client, pipeline):
    resp = await post(client, COMPLETIONS, {"prompt": 3})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "prompt"


async def test_unexpected_exception_gives_openai_error_body(client, pipeline):
    pipeline.script = [RuntimeError("internal detail")]
    resp = await post(client, CHAT, {"messages": USER})
    assert resp.status == 500
    err = (await resp.json())["error"]
    assert err["type"] == "server_error"
    assert "internal detail" not in err["message"]


async def test_unexpected_exception_does_not_leak_detail(client, pipeline):
    pipeline.script = [RuntimeError("internal detail")]
    resp = await post(client, CHAT, {"messages": USER})
    assert resp.status == 500
    assert "internal detail" not in await resp.text()


# ------------------------------------------------------------ streaming


async def test_chat_stream_shape(client, pipeline):
    pipeline.script = answer("Hel", "lo")
    resp = await post(client, CHAT, {"messages": USER, "stream": True}, headers={"x-request-id": "s1"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["x-request-id"] == "s1"
    events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for c in chunks:
        assert c["id"] == "chatcmpl-s1"
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == MODEL
        assert isinstance(c["created"], int)
        assert "usage" not in c  # include_usage not asked for
    first, *middle, last = chunks
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
    ]
    assert [c["choices"][0]["delta"] for c in middle] == [{"content": "Hel"}, {"content": "lo"}]
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]
    assert pipeline.closed.is_set()


async def test_chat_stream_text_on_final_chunk(client, pipeline):
    pipeline.script = [TokenChunk((1,), "A"), TokenChunk((2,), "B", finish=Finish.LENGTH, usage=Usage(3, 2))]
    resp = await post(client, CHAT, {"messages": USER, "stream": True})
    chunks = sse_events(await resp.text())[:-1]
    assert chunks[-1]["choices"][0]["delta"] == {"content": "B"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "AB"


async def test_empty_text_chunks_not_sent(client, pipeline):
    pipeline.script = [TokenChunk((1,), ""), TokenChunk((2,), "x"), TokenChunk((3,), ""),
                       TokenChunk((), "", finish=Finish.STOP, usage=Usage(1, 3))]
    resp = await post(client, CHAT, {"messages": USER, "stream": True})
    chunks = sse_events(await resp.text())[:-1]
    assert len(chunks) == 3  # role, "x", finish


async def test_chat_stream_include_usage(client, pipeline):
    pipeline.script = answer("Hi", usage=Usage(prompt_tokens=7, completion_tokens=1, cached_tokens=3))
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(await (await post(client, CHAT, body)).text())
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 3}
    }
    # the content chunks carry usage: null, as OpenAI's do
    content_chunks = [e for e in events[:-2] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert content_chunks and all(c["usage"] is None for c in content_chunks)
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


async def test_completion_stream_shape(client, pipeline):
    pipeline.script = answer("Once", " upon", finish=Finish.LENGTH)
    resp = await post(client, COMPLETIONS, {"prompt": "x", "stream": True}, headers={"x-request-id": "cs"})
    events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["choices"][0]["text"] for c in chunks] == ["Once", " upon", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert all(c["object"] == "text_completion" and c["id"] == "cmpl-cs" for c in chunks)
    assert all("delta" not in c["choices"][0] for c in chunks)


async def test_completion_stream_include_usage(client, pipeline):
    pipeline.script = answer("a")
    body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(await (await post(client, COMPLETIONS, body)).text())
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 1


async def test_stream_unicode_not_escaped(client, pipeline):
    pipeline.script = answer("héllo ", "😀 世界")
    raw = await (await post(client, CHAT, {"messages": USER, "stream": True})).text()
    assert "😀 世界" in raw
    chunks = sse_events(raw)[:-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "héllo 😀 世界"


async def test_error_mid_stream_is_sse_error_then_done(client, pipeline):
    pipeline.script = [TokenChunk((1,), "partial"), Unavailable("worker died")]
    resp = await post(client, CHAT, {"messages": USER, "stream": True})
    assert resp.status == 200  # already committed
    events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": "worker died", "type": "service_unavailable", "param": None,
                                    "code": "service_unavailable"}}
    assert events[1]["choices"][0]["delta"] == {"content": "partial"}
    assert pipeline.closed.is_set()


async def test_error_mid_completion_stream(client, pipeline):
    pipeline.script = [TokenChunk((1,), "a"), InvalidArgument("sampling.stop[0]", "bad")]
    events = sse_events(await (await post(client, COMPLETIONS, {"prompt": "x", "stream": True})).text())
    assert events[-2]["error"]["param"] == "stop[0]"
    assert events[-1] == "[DONE]"


async def test_client_disconnect_closes_pipeline(client, pipeline):
    gate = Wait()
    pipeline.script = [TokenChunk((1,), "first"), gate, *answer("never")]
    resp = await post(client, CHAT, {"messages": USER, "stream": True})
    assert resp.status == 200
    # read up to the first content chunk, then hang up
    seen = b""
    while b'"first"' not in seen:
        seen += await resp.content.readany()
    resp.close()
    await asyncio.wait_for(pipeline.closed.wait(), timeout=30)
    assert pipeline.cancelled
    gate.event.set()


# ------------------------------------------------------------ models, healthz


async def test_models_list(client):
    resp = await client.get("/v1/models")
    assert resp.status == 200
    assert await resp.json() == {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 1_700_000_000, "owned_by": "llmfabric",
                  "max_model_len": 2048}],
    }


async def test_models_empty_while_loading(client, pipeline):
    pipeline.models = []
    assert await (await client.get("/v1/models")).json() == {"object": "list", "data": []}
    assert await (await client.get("/healthz")).json() == {"status": "loading"}


async def test_healthz_ok(client):
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}


async def test_wrong_method_and_path(client):
    assert (await client.get(CHAT)).status == 405
    assert (await client.post("/v1/embeddings", json={})).status == 404


# ------------------------------------------------------------ error_body unit


def test_error_body_without_field_keeps_message():
    status, body = error_body(FabricError("sampling.thing went wrong"))
    assert status == 500
    assert body["error"]["message"] == "sampling.thing went wrong"  # only stripped when a field is named
    assert body["error"]["param"] is None


def test_error_body_relayed_code():
    err = FabricError("nope", field="model")
    import grpc

    err.code = grpc.StatusCode.NOT_FOUND  # as error_from_rpc builds it
    status, body = error_body(err)
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"

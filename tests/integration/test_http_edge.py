"""REST (transcoded, SSE) and the OpenAI-compatible API through the real
Envoy edge: raw HTTP, the raw event stream, and the official openai SDK."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest
from fabric_testing import bearer

pytestmark = pytest.mark.integration

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _sse_events(raw: bytes) -> list[str]:
    """The data payloads of a raw SSE body, checking the framing."""
    text = raw.decode()
    assert text.endswith("\n\n"), "an SSE stream ends with a blank line"
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), f"unexpected SSE block {block!r}"
        events.append(block[len("data: "):])
    return events


@pytest.fixture
async def http(edge, api_key):
    async with aiohttp.ClientSession(f"http://{edge}", headers=bearer(api_key)) as session:
        yield session


async def test_rest_unary_chat(http):
    async with http.post("/api/v1/chat", json={"messages": MESSAGES, "options": {"sampling": {"max_tokens": 16, "temperature": 0}}}) as r:
        assert r.status == 200
        body = await r.json()
    assert "Paris" in body["message"]["content"]
    assert body["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert body["usage"]["completion_tokens"] <= 16


async def test_rest_sse_stream_raw(http):
    payload = {"messages": MESSAGES, "options": {"sampling": {"max_tokens": 16, "temperature": 0}}}
    async with http.post("/api/v1/chat:stream", json=payload) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = await r.read()
    events = [json.loads(e) for e in _sse_events(raw)]
    assert len(events) > 1
    text = "".join(e["delta"] for e in events)
    assert "Paris" in text
    assert events[-1]["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert events[-1]["usage"]["completion_tokens"] >= 1


async def test_rest_models(http):
    async with http.get("/api/v1/models") as r:
        assert r.status == 200
        assert (await r.json())["models"][0]["name"] == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/api/v1/generate", b'{"prompt": ""}', 400, "prompt"),
        ("/api/v1/generate", b'{"prompt": "hi", "options": {"sampling": {"temperature": -1}}}', 400, "temperature"),
        ("/api/v1/generate", b'{"prompt": "hi", "options": {"sampling": {"max_tokens": 99999}}}', 400, "max_tokens"),
        ("/api/v1/generate", b'{"prompt": "hi", "options": {"model": "nope"}}', 404, "nope"),
        ("/api/v1/generate", b'{"prompt": ', 400, ""),
        ("/api/v1/chat:stream", b'{"messages": []}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', 400, "temperature"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, "max_tokens"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ""}]}', 400, "messages[0].content"),
        ("/v1/chat/completions", b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', 404, "gpt-4o"),
        ("/v1/chat/completions", b'{not json', 400, "JSON"),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
        ("/v1/completions", b'{"prompt": ""}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": "hi", "top_p": 0}', 400, "top_p"),
    ],
)
async def test_bad_input_gets_4xx_naming_the_field(http, path, body, status, needle):
    async with http.post(path, data=body, headers={"content-type": "application/json"}) as r:
        assert r.status == status, await r.text()
        data = await r.json()
    message = data["error"]["message"] if "error" in data else data["message"]
    assert needle in message


async def test_openai_errors_have_openai_shape(http):
    async with http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "top_p": 2}) as r:
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "top_p"


async def test_openai_raw_sse_ends_with_done(http):
    payload = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 8, "temperature": 0,
               "messages": MESSAGES, "stream_options": {"include_usage": True}}
    async with http.post("/v1/chat/completions", json=payload) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = await r.read()
    events = _sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 8
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


@pytest.fixture
def client(edge, api_key):
    return openai.OpenAI(base_url=f"http://{edge}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_openai_sdk_chat(client):
    resp = client.chat.completions.create(model="smollm2-135m-instruct", messages=MESSAGES, max_tokens=16, temperature=0)
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 16
    assert 0 <= resp.usage.prompt_tokens_details.cached_tokens < resp.usage.prompt_tokens


def test_openai_usage_reports_prefix_cache_hits(client):
    messages = [MESSAGES[0], {"role": "user", "content": "Repeat after me: cached prefixes are fast."}]
    client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=4, temperature=0)
    again = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1  # all but the last token


def test_openai_sdk_chat_stream(client):
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    unary = client.chat.completions.create(model="smollm2-135m-instruct", messages=MESSAGES, max_tokens=16, temperature=0)
    assert "".join(parts) == unary.choices[0].message.content
    assert finish == unary.choices[0].finish_reason
    assert usage.completion_tokens == unary.usage.completion_tokens


def test_openai_sdk_completions_and_models(client):
    resp = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert resp.choices[0].text
    assert resp.usage.completion_tokens <= 5
    assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]


def test_openai_sdk_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=MESSAGES, temperature=7)
    assert "temperature" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)

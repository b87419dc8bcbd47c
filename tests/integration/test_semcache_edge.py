"""The semantic cache through the real Envoy edge, with the real MiniLM
embedder and the real model: a greedy answer is stored, then replayed as an
OpenAI SSE stream and as a gRPC stream (same chunk shape, marked as cached);
paraphrases hit, different questions and tenants do not; per-request
controls; a cancelled stream is never stored; entries survive a restart of
the stack's cache."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import grpc
import pytest

from fabric_testing import bearer, edge_channel, eventually  # tests/ is on sys.path (tests/conftest.py)

from llmfabric.cli.processes import free_port
from llmfabric.cli.stack import Stack, StackOptions
from llmfabric.common.v1 import common_pb2
from llmfabric.gateway.apikeys import generate_api_key
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc
from llmfabric.semcache.v1 import semcache_pb2, semcache_pb2_grpc

pytestmark = pytest.mark.integration
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
# Tenants come from API keys at the edge (a client's own x-tenant-id is dropped there).
KEYS = {"main": generate_api_key(), "someone-else": generate_api_key()}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    opts = StackOptions(workers=1, edge_port=free_port(), admin_port=free_port(), drain_seconds=3.0,
                        state_dir=tmp_path_factory.mktemp("semcache"), semcache=True,
                        api_keys=",".join(f"{k}:{t}" for t, k in KEYS.items()))
    st = Stack(opts)
    asyncio.run(st.start())
    yield st
    st.stop()


@pytest.fixture
async def http(cached):
    async with aiohttp.ClientSession(f"http://127.0.0.1:{cached.opts.edge_port}", headers=bearer(KEYS["main"])) as session:
        yield session


@pytest.fixture
async def cache_stub(cached):
    async with grpc.aio.insecure_channel(cached.get("semcache").grpc) as ch:
        yield semcache_pb2_grpc.SemanticCacheServiceStub(ch)


def unique(question: str) -> str:
    """A question no other test asked (the stack is shared by this module)."""
    return f"{question} (ref {uuid.uuid4().hex[:6]})"


async def sse(http, question: str, headers=None, tenant="", max_tokens=24, temperature=0.0):
    body = {"model": "", "messages": [SYSTEM, {"role": "user", "content": question}], "stream": True,
            "max_tokens": max_tokens, "temperature": temperature}
    hdrs = {**(headers or {}), **bearer(KEYS[tenant or "main"])}
    async with http.post("/v1/chat/completions", json=body, headers=hdrs) as r:
        assert r.status == 200, await r.text()
        raw = (await r.read()).decode()
        events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        return r.headers.get("x-llmfabric-cache"), r.headers.get("x-llmfabric-cache-similarity"), text, chunks


async def stored_count(stub) -> int:
    return (await stub.GetStats(semcache_pb2.GetStatsRequest())).entries


async def settled_count(stub) -> int:
    """Entries once earlier tests' background stores have landed (two reads 0.3 s apart agree)."""
    n = await stored_count(stub)
    for _ in range(30):
        await asyncio.sleep(0.3)
        m = await stored_count(stub)
        if m == n:
            return n
        n = m
    raise AssertionError("the cache's entry count never settled")


async def test_answer_is_stored_then_replayed_as_sse(http, cache_stub):
    q = unique("Name three primary colors.")
    status, _, text, chunks = await sse(http, q)
    assert status == "miss"
    await eventually(lambda: _has_entries(cache_stub), timeout=10, what="answer stored")
    status2, sim, text2, chunks2 = await sse(http, q)
    assert status2 == "hit-exact" and float(sim) == 1.0 and text2 == text
    assert [c["choices"][0]["finish_reason"] for c in chunks2 if c["choices"]][-1] == chunks[-1]["choices"][0]["finish_reason"]
    assert len(chunks2) > 2, "a hit streams as several chunks, like a live answer"


async def _has_entries(stub) -> bool:
    return await stored_count(stub) > 0


async def test_paraphrase_hits_semantically_and_different_questions_do_not(http, cache_stub):
    base = "What is the boiling point of water at sea level in Celsius?"
    status, _, text, _ = await sse(http, base)
    n = await stored_count(cache_stub)
    await eventually(lambda: _count_above(cache_stub, n - 1), timeout=10)
    status, sim, text2, _ = await sse(http, "what is the boiling point of water at sea level in celsius")
    assert status == "hit-semantic" and 0.8 < float(sim) <= 1.0 and text2 == text
    assert (await sse(http, "What is the boiling point of water at sea level in Fahrenheit?"))[0] == "miss"
    assert (await sse(http, "What is the freezing point of water at sea level in Celsius?"))[0] == "miss"
    assert (await sse(http, base, tenant="someone-else"))[0] == "miss"  # another tenant never gets it


async def _count_above(stub, n: int) -> bool:
    return await stored_count(stub) > n


async def test_controls_skip_no_store_threshold_and_nondeterministic(http, cache_stub):
    ref = uuid.uuid4().hex[:6]
    q, para = f"Give one synonym for happy. (ref {ref})", f"Could you give me one synonym for happy? (ref {ref})"
    n0 = await settled_count(cache_stub)
    assert (await sse(http, q, headers={"x-llmfabric-cache-control": "no-store"}))[0] == "miss"
    await asyncio.sleep(0.5)
    assert await stored_count(cache_stub) == n0
    await sse(http, q)
    await eventually(lambda: _count_above(cache_stub, n0), timeout=10)
    assert (await sse(http, q, headers={"x-llmfabric-cache-control": "skip"}))[0] == "off"
    assert (await sse(http, q, temperature=0.8))[0] == "off"  # sampled answers are not cached by default
    assert (await sse(http, para, headers={"x-llmfabric-cache-threshold": "1", "x-llmfabric-cache-control": "no-store"}))[0] == "miss"
    assert (await sse(http, para, headers={"x-llmfabric-cache-threshold": "0.5"}))[0] == "hit-semantic"
    async with http.post("/v1/chat/completions", json={"messages": [SYSTEM, {"role": "user", "content": q}]},
                         headers={"x-llmfabric-cache-control": "bogus"}) as r:
        assert r.status == 400 and "x-llmfabric-cache-control" in (await r.json())["error"]["message"]


async def test_grpc_stream_replay_carries_the_cache_fields(cached, cache_stub):
    q = unique("List two planets.")
    async with edge_channel(f"127.0.0.1:{cached.opts.edge_port}", KEYS["main"]) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        req = inference_pb2.ChatStreamRequest(
            messages=[common_pb2.ChatMessage(role="system", content=SYSTEM["content"]), common_pb2.ChatMessage(role="user", content=q)],
            options=inference_pb2.RequestOptions(sampling=common_pb2.SamplingParams(temperature=0, max_tokens=16)))
        first = [r async for r in stub.ChatStream(req)]
        assert {r.cache.status for r in first} == {inference_pb2.CACHE_STATUS_MISS}
        n = await stored_count(cache_stub)
        await eventually(lambda: _count_above(cache_stub, n - 1), timeout=10)
        call = stub.ChatStream(req)
        md = dict(await call.initial_metadata())
        again = [r async for r in call]
        assert md["x-llmfabric-cache"] == "hit-exact"
        assert {r.cache.status for r in again} == {inference_pb2.CACHE_STATUS_HIT_EXACT}
        assert "".join(r.delta for r in again) == "".join(r.delta for r in first)
        assert again[-1].finish_reason == first[-1].finish_reason
        assert again[-1].usage.cached_tokens == again[-1].usage.prompt_tokens  # every prompt token came from the cache
        skipped = await stub.Chat(inference_pb2.ChatRequest(messages=req.messages, options=inference_pb2.RequestOptions(
            sampling=req.options.sampling, cache=inference_pb2.CacheControl(skip=True))))
        assert skipped.cache.status == inference_pb2.CACHE_STATUS_UNSPECIFIED


async def test_a_cancelled_stream_is_never_stored(http, cache_stub):
    q = unique("Write a long essay about the history of bread.")
    n0 = await settled_count(cache_stub)
    body = {"messages": [SYSTEM, {"role": "user", "content": q}], "stream": True, "max_tokens": 200, "temperature": 0}
    async with http.post("/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.headers["x-llmfabric-cache"] == "miss"
        await r.content.readuntil(b"\n\n")  # the first event, then hang up
    await asyncio.sleep(1.5)
    assert await stored_count(cache_stub) == n0
    assert (await sse(http, q, max_tokens=200))[0] == "miss"

"""Cache-aware routing and priorities over two real embedded workers."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmfabric.cli.processes import free_port
from llmfabric.cli.stack import Stack, StackOptions
from llmfabric.common.v1 import common_pb2
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

SYSTEMS = [
    "You are a meticulous librarian. " * 20,
    "You are a cheerful travel guide for Italy. " * 20,
]


@pytest.fixture(scope="module")
def cache_aware(tmp_path_factory):
    opts = StackOptions(workers=2, routing="cache_aware", edge_port=free_port(), admin_port=free_port(),
                        state_dir=tmp_path_factory.mktemp("routing"), drain_seconds=3.0, semcache=False)
    st = Stack(opts)
    asyncio.run(st.start())
    yield st
    st.stop()


async def _chat(stub, system: str, question: str, priority: int = 0) -> inference_pb2.ChatResponse:
    return await stub.Chat(inference_pb2.ChatRequest(
        messages=[common_pb2.ChatMessage(role="system", content=system), common_pb2.ChatMessage(role="user", content=question)],
        options=inference_pb2.RequestOptions(sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0), priority=priority),
    ), timeout=120)


async def _prompt_totals(stack: Stack) -> list[int]:
    out = []
    for name in ("worker-0", "worker-1"):
        async with grpc.aio.insecure_channel(stack.get(name).grpc) as ch:
            load = await worker_pb2_grpc.WorkerServiceStub(ch).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
        out.append(load.prompt_tokens_total)
    return out


async def test_shared_prefixes_stick_to_one_worker_and_hit_its_cache(cache_aware):
    edge = f"127.0.0.1:{cache_aware.opts.edge_port}"
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        first = [await _chat(stub, s, "Hello?") for s in SYSTEMS]
        assert all(r.usage.cached_tokens == 0 for r in first)
        before = await _prompt_totals(cache_aware)
        assert all(t > 0 for t in before), "the two prefixes went to different workers"
        for i in range(3):
            for s in SYSTEMS:
                r = await _chat(stub, s, f"Question {i}: what do you do?")
                # the prefix (system prompt) was cached on the worker this request reached
                assert r.usage.cached_tokens >= len(s.split()) // 2, r.usage
        # and the two workers kept sharing the load, one prefix each
        after = await _prompt_totals(cache_aware)
        assert all(a > b for a, b in zip(after, before))


async def test_priority_header_and_field_are_accepted_end_to_end(cache_aware):
    edge = f"127.0.0.1:{cache_aware.opts.edge_port}"
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        r = await _chat(stub, SYSTEMS[0], "Hi", priority=common_pb2.PRIORITY_BACKGROUND)
        assert r.usage.completion_tokens >= 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Chat(inference_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="user", content="Hi")]),
                            metadata=(("x-priority", "urgent"),), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-priority" in info.value.details()

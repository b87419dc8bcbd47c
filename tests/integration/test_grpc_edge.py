"""The public gRPC API through the real Envoy edge, the real services and
the real model."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fabric_testing import bearer, edge_channel

from llmfabric.common.v1 import common_pb2
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

SYSTEM = common_pb2.ChatMessage(role="system", content="You are a helpful assistant.")


def _opts(**sampling) -> inference_pb2.RequestOptions:
    return inference_pb2.RequestOptions(sampling=common_pb2.SamplingParams(**sampling))


@pytest.fixture
async def stub(edge, api_key):
    async with edge_channel(edge, api_key) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def test_chat_unary(stub):
    resp = await stub.Chat(
        inference_pb2.ChatRequest(
            messages=[SYSTEM, common_pb2.ChatMessage(role="user", content="What is the capital of France?")],
            options=_opts(max_tokens=24, temperature=0),
        ),
        timeout=60,
    )
    assert "Paris" in resp.message.content
    assert resp.message.role == "assistant"
    assert resp.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert 0 < resp.usage.completion_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model == "smollm2-135m-instruct"
    assert resp.request_id


async def test_chat_stream_matches_unary(stub):
    messages = [SYSTEM, common_pb2.ChatMessage(role="user", content="Name three colors.")]
    unary = await stub.Chat(inference_pb2.ChatRequest(messages=messages, options=_opts(max_tokens=20, temperature=0)), timeout=60)
    chunks = [c async for c in stub.ChatStream(
        inference_pb2.ChatStreamRequest(messages=messages, options=_opts(max_tokens=20, temperature=0)), timeout=60)]
    assert len(chunks) > 1
    assert "".join(c.delta for c in chunks) == unary.message.content  # greedy: same answer
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == unary.finish_reason
    assert last.usage.completion_tokens == unary.usage.completion_tokens
    assert sum(c.token_count for c in chunks) == last.usage.completion_tokens


async def test_generate_unary_and_stream(stub):
    resp = await stub.Generate(inference_pb2.GenerateRequest(prompt="The sky is", options=_opts(max_tokens=8, temperature=0)), timeout=60)
    assert resp.text and resp.usage.completion_tokens <= 8
    chunks = [c async for c in stub.GenerateStream(
        inference_pb2.GenerateStreamRequest(prompt="The sky is", options=_opts(max_tokens=8, temperature=0)), timeout=60)]
    assert "".join(c.text for c in chunks) == resp.text


async def test_stop_sequence_and_max_tokens(stub):
    messages = [SYSTEM, common_pb2.ChatMessage(role="user", content="Count from 1 to 20, separated by commas.")]
    full = await stub.Chat(inference_pb2.ChatRequest(messages=messages, options=_opts(max_tokens=40, temperature=0)), timeout=60)
    assert "5" in full.message.content
    stopped = await stub.Chat(
        inference_pb2.ChatRequest(messages=messages, options=_opts(max_tokens=40, temperature=0, stop=["5"])), timeout=60)
    assert stopped.finish_reason == common_pb2.FINISH_REASON_STOP
    assert stopped.message.content == full.message.content.split("5")[0]
    short = await stub.Chat(inference_pb2.ChatRequest(messages=messages, options=_opts(max_tokens=3, temperature=0)), timeout=60)
    assert short.finish_reason == common_pb2.FINISH_REASON_LENGTH and short.usage.completion_tokens == 3


async def test_seeded_sampling_is_reproducible(stub):
    req = inference_pb2.ChatRequest(
        messages=[SYSTEM, common_pb2.ChatMessage(role="user", content="Tell me a short story.")],
        options=_opts(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234),
    )
    a = await stub.Chat(req, timeout=60)
    b = await stub.Chat(req, timeout=60)
    assert a.message.content == b.message.content


async def test_list_models(stub):
    resp = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
    assert [m.name for m in resp.models] == ["smollm2-135m-instruct"]
    assert resp.models[0].context_length == 2048


async def test_health_and_reflection_through_edge(edge, api_key):
    async with grpc.aio.insecure_channel(edge) as channel:  # health needs no key (probes)
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="llmfabric.inference.v1.InferenceService"), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        names = []
        requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        async for r in refl.ServerReflectionInfo(requests, timeout=5, metadata=bearer(api_key).items()):
            names = [s.name for s in r.list_services_response.service]
        assert "llmfabric.inference.v1.InferenceService" in names
        assert "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (inference_pb2.ChatRequest(messages=[]), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        (inference_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="user", content="")]),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content"),
        (inference_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="wizard", content="hi")]),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role"),
        (inference_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="user", content="hi")], options=_opts(temperature=3.5)),
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (inference_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="user", content="hi")], options=_opts(max_tokens=5000)),
         grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (inference_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="user", content="hello " * 3000)]),
         grpc.StatusCode.INVALID_ARGUMENT, "context window"),
        (inference_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="user", content="hi")],
                                   options=inference_pb2.RequestOptions(model="gpt-9")),
         grpc.StatusCode.NOT_FOUND, "gpt-9"),
    ],
)
async def test_bad_input_is_rejected_with_the_field_named(stub, request_, code, needle):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Chat(request_, timeout=30)
    assert info.value.code() == code
    assert needle in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.ChatStream(inference_pb2.ChatStreamRequest(messages=request_.messages, options=request_.options), timeout=30):
            pass
    assert info.value.code() == code


async def test_empty_prompt_rejected(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(inference_pb2.GenerateRequest(prompt=""), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in info.value.details()


async def test_cached_tokens_reported_in_grpc_usage(stub):
    req = inference_pb2.ChatRequest(
        messages=[SYSTEM, common_pb2.ChatMessage(role="user", content="Tell me about prefix caching in one line.")],
        options=_opts(max_tokens=4, temperature=0),
    )
    first = await stub.Chat(req, timeout=60)
    second = await stub.Chat(req, timeout=60)
    assert first.message.content == second.message.content  # same greedy answer, cold or cached
    assert second.usage.cached_tokens == second.usage.prompt_tokens - 1


async def test_scheduler_metrics_count_levels_and_routing(stub, stack):
    import urllib.request

    req = inference_pb2.ChatRequest(
        messages=[SYSTEM, common_pb2.ChatMessage(role="user", content="Hi")],
        options=inference_pb2.RequestOptions(sampling=common_pb2.SamplingParams(max_tokens=2),
                                             priority=common_pb2.PRIORITY_BATCH),
    )
    await stub.Chat(req, timeout=60)
    body = urllib.request.urlopen(f"http://{stack.get('scheduler').metrics}/metrics", timeout=5).read().decode()  # noqa: S310
    assert 'llmfabric_scheduler_requests_total{level="batch",outcome="admitted"}' in body
    assert 'llmfabric_scheduler_requests_total{level="batch",outcome="completed"}' in body
    assert 'llmfabric_scheduler_routing_decisions_total{policy="cache_aware"' in body
    assert 'llmfabric_scheduler_queue_wait_seconds_count{level="batch"}' in body
    assert 'llmfabric_scheduler_time_to_first_token_seconds_count{level="batch"}' in body

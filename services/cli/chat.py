"""``llmfabric chat``: stream an answer through the edge over gRPC."""

from __future__ import annotations

import sys

import grpc

from llmfabric.common.v1 import common_pb2
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc


async def run_chat(edge: str, prompt: str, system: str, max_tokens: int, temperature: float | None,
                   api_key: str = "") -> int:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens)
    if temperature is not None:
        sampling.temperature = temperature
    messages = [common_pb2.ChatMessage(role="system", content=system)] if system else []
    messages.append(common_pb2.ChatMessage(role="user", content=prompt))
    request = inference_pb2.ChatStreamRequest(messages=messages, options=inference_pb2.RequestOptions(sampling=sampling))
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
            async for chunk in stub.ChatStream(request, timeout=300, metadata=metadata):
                sys.stdout.write(chunk.delta)
                sys.stdout.flush()
                if chunk.HasField("usage"):
                    u = chunk.usage
                    print(f"\n[{common_pb2.FinishReason.Name(chunk.finish_reason)}; "
                          f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]", file=sys.stderr)
        except grpc.aio.AioRpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0

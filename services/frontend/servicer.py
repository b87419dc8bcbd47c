"""gRPC methods of the public llmfabric.inference.v1.InferenceService."""

from __future__ import annotations

import time

from llmfabric.common.v1 import common_pb2
from llmfabric.convert import finish_to_pb, usage_to_pb
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc
from llmfabric.runtime.context import current_request_id
from llmfabric.runtime.errors import FabricError
from llmfabric.structs import Finish, TokenChunk

from .answer_cache import CONTROL_HEADER, THRESHOLD_HEADER, CacheControl, CacheOutcome
from .headers import PRIORITY_HEADER, TENANT_HEADER, from_metadata, priority_from_header
from .pipeline import Answer, GenerationInput, Pipeline, collect, message_pairs

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def _deadline(context) -> float | None:
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def _input(self, request, context, *, prompt: str | None = None, messages=None) -> GenerationInput:
        opts, md = request.options, context.invocation_metadata()
        return GenerationInput(
            request_id=opts.request_id or current_request_id(),
            model=opts.model,
            prompt=prompt,
            messages=messages,
            sampling=opts.sampling,
            tenant_id=from_metadata(md, TENANT_HEADER),
            priority=opts.priority or priority_from_header(from_metadata(md, PRIORITY_HEADER)),
            cache=CacheControl.parse(from_metadata(md, CONTROL_HEADER), from_metadata(md, THRESHOLD_HEADER),
                                     opts.cache if opts.HasField("cache") else None),
        )

    async def _start(self, inp: GenerationInput, context) -> Answer:
        """Validate and consult the cache; tell the caller the cache verdict in the initial metadata (HTTP
        headers at the edge) before any chunk."""
        answer = await self.pipeline.start(inp, _deadline(context))
        await context.send_initial_metadata(tuple(answer.cache.headers().items()))
        return answer

    async def Generate(self, request, context):
        inp = self._input(request, context, prompt=request.prompt)
        answer = await self._start(inp, context)
        text, last = await collect(answer.chunks)
        return inference_pb2.GenerateResponse(
            text=text, finish_reason=finish_to_pb(last.finish), usage=usage_to_pb(last.usage),
            model=self._model(inp), request_id=inp.request_id, cache=_cache_pb(answer.cache),
        )

    async def GenerateStream(self, request, context):
        inp = self._input(request, context, prompt=request.prompt)
        async for chunk, n, err, cache in self._chunks(inp, context):
            yield inference_pb2.GenerateStreamResponse(text=chunk.text, token_count=n, **self._tail(inp, chunk, err, cache))

    async def Chat(self, request, context):
        inp = self._input(request, context, messages=message_pairs(request.messages))
        answer = await self._start(inp, context)
        text, last = await collect(answer.chunks)
        return inference_pb2.ChatResponse(
            message=common_pb2.ChatMessage(role="assistant", content=text),
            finish_reason=finish_to_pb(last.finish), usage=usage_to_pb(last.usage),
            model=self._model(inp), request_id=inp.request_id, cache=_cache_pb(answer.cache),
        )

    async def ChatStream(self, request, context):
        inp = self._input(request, context, messages=message_pairs(request.messages))
        async for chunk, n, err, cache in self._chunks(inp, context):
            yield inference_pb2.ChatStreamResponse(delta=chunk.text, token_count=n, **self._tail(inp, chunk, err, cache))

    async def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(
            models=[inference_pb2.Model(name=m.name, context_length=m.context_length, owned_by="llmfabric") for m in self.pipeline.models]
        )

    async def _chunks(self, inp: GenerationInput, context):
        """(chunk, token count, error, cache outcome) worth sending: empty intermediate chunks (a
        partial UTF-8 character has no text yet) are merged into the next.

        A failure before anything was sent is the call's status (HTTP status
        at the edge); after that it becomes a last chunk with finish reason
        ERROR and the error's details, which REST/SSE callers can see too.
        """
        answer = await self._start(inp, context)
        pending, sent = 0, False
        try:
            async for chunk in answer.chunks:
                pending += len(chunk.token_ids)
                if chunk.text or chunk.finish is not None:
                    sent = True
                    yield chunk, pending, None, answer.cache
                    pending = 0
        except FabricError as err:
            if not sent:
                raise
            yield TokenChunk(token_ids=(), text="", finish=Finish.ERROR), pending, err, answer.cache

    def _tail(self, inp: GenerationInput, chunk: TokenChunk, error: FabricError | None = None,
              cache: CacheOutcome = CacheOutcome()) -> dict:
        out: dict = {"model": self._model(inp), "request_id": inp.request_id, "cache": _cache_pb(cache)}
        if chunk.finish is not None:
            out["finish_reason"] = finish_to_pb(chunk.finish)
            if chunk.usage is not None:
                out["usage"] = usage_to_pb(chunk.usage)
        if error is not None:
            out["error"] = error.info()
        return out

    def _model(self, inp: GenerationInput) -> str:
        return self.pipeline.models[0].name if self.pipeline.models else inp.model


def _cache_pb(outcome: CacheOutcome) -> inference_pb2.CacheResult:
    return inference_pb2.CacheResult(**outcome.to_pb_fields())

"""The request path shared by the gRPC and the OpenAI APIs:
tokenizer.Prepare → semantic cache lookup → (hit: replay | miss:
scheduler.Submit, then store) → token chunks.

Errors from either service arrive as the same domain errors the services
raised (``error_from_rpc``), so both APIs map them identically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from llmfabric.common.v1 import common_pb2
from llmfabric.convert import chunk_from_pb, request_from_pb, request_to_pb
from llmfabric.runtime.context import outgoing_metadata
from llmfabric.runtime.errors import (
    DeadlineExceeded,
    FabricError,
    Unavailable,
    error_from_rpc,
)
from llmfabric.runtime.upstream import Upstream
from llmfabric.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from llmfabric.structs import TokenChunk, ValidatedRequest
from llmfabric.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from .answer_cache import AnswerCache, CacheControl, CacheOutcome, cache_key

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationInput:
    """A client request as either API received it."""

    request_id: str  # fabric-wide id
    model: str  # requested model ("" = default)
    prompt: str | None  # raw prompt, or
    messages: tuple[tuple[str, str], ...] | None  # (role, content) pairs
    sampling: common_pb2.SamplingParams  # client values (unset = default)
    tenant_id: str = ""  # from the edge
    priority: int = 0  # common.v1.Priority
    cache: CacheControl = CacheControl()  # answer-cache controls


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """A validated request's answer: where it comes from, and its chunks."""

    request: ValidatedRequest  # as the tokenizer resolved it
    cache: CacheOutcome  # hit, miss or not consulted
    chunks: AsyncIterator[TokenChunk]  # replayed or generated


@dataclasses.dataclass(frozen=True, slots=True)
class ModelCard:
    """A served model."""

    name: str  # model id
    context_length: int  # tokens
    created: int  # unix seconds the frontend learned of it


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed")
    return left


class Pipeline:
    """Clients of the tokenizer and the scheduler."""

    def __init__(self, tokenizer: str, scheduler: str, cache: AnswerCache | None = None, *, consul_url: str = "") -> None:
        """``tokenizer`` and ``scheduler`` are targets: ``host:port[,...]`` or ``consul:<service>``."""
        self._tokenizers = Upstream("tokenizer", tokenizer, tokenizer_pb2_grpc.TokenizerServiceStub, consul_url=consul_url)
        self._schedulers = Upstream("scheduler", scheduler, scheduler_pb2_grpc.SchedulerServiceStub, consul_url=consul_url)
        self.models: list[ModelCard] = []
        self.cache = cache  # None: no semantic cache configured

    async def connect(self, timeout: float = 120.0) -> None:
        """Follow discovery, wait until a tokenizer answers and learn the served models."""
        await self._tokenizers.start()
        await self._schedulers.start()
        if self.cache is not None:
            await self.cache.start()
        start = time.monotonic()
        while True:
            try:
                info = await self._tokenizers.stub().GetModelInfo(tokenizer_pb2.GetModelInfoRequest(), timeout=5)
                self.models = [ModelCard(info.model, info.context_length, int(time.time()))]
                return
            except (grpc.aio.AioRpcError, Unavailable) as err:
                if time.monotonic() - start > timeout:
                    why = f"{err.code().name} {err.details()}" if isinstance(err, grpc.aio.AioRpcError) else str(err)
                    raise RuntimeError(f"tokenizer not reachable: {why}") from None
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        await self._tokenizers.close()
        await self._schedulers.close()

    async def prepare(self, inp: GenerationInput, deadline: float | None) -> ValidatedRequest:
        req = tokenizer_pb2.PrepareRequest(
            request_id=inp.request_id,
            model=inp.model,
            sampling=inp.sampling,
            tenant=common_pb2.Tenant(id=inp.tenant_id),
            priority=inp.priority,
        )
        if inp.messages is not None:
            req.conversation.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in inp.messages)
        else:
            req.prompt = inp.prompt or ""
        try:
            resp = await self._tokenizers.stub().Prepare(req, timeout=_remaining(deadline), metadata=outgoing_metadata())
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        return request_from_pb(resp.request)

    async def stream(self, request: ValidatedRequest, deadline: float | None) -> AsyncIterator[TokenChunk]:
        """Chunks from the scheduler; cancelling the consumer cancels the call
        (and so the generation on the worker)."""
        call = self._schedulers.stub().Submit(
            scheduler_pb2.SubmitRequest(request=request_to_pb(request)),
            timeout=_remaining(deadline),
            metadata=outgoing_metadata(),
        )
        try:
            async for resp in call:
                yield chunk_from_pb(resp.chunk)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()

    async def start(self, inp: GenerationInput, deadline: float | None = None) -> Answer:
        """Validate, consult the cache; bad input raises here, before anything streams."""
        validated = await self.prepare(inp, deadline)
        if self.cache is None:
            return Answer(validated, CacheOutcome(), self.stream(validated, deadline))
        key = cache_key(validated.model, validated.tenant_id, validated.cache_salt, inp.messages, inp.prompt,
                        request_to_pb(validated).sampling)
        outcome, replay = await self.cache.lookup(key, inp.cache)
        if replay is not None:
            return Answer(validated, outcome, _replay(replay))
        return Answer(validated, outcome, self.cache.recording(key, inp.cache, self.stream(validated, deadline)))

    async def run(self, inp: GenerationInput, deadline: float | None = None) -> AsyncIterator[TokenChunk]:
        """``start`` then its chunks."""
        answer = await self.start(inp, deadline)
        async for chunk in answer.chunks:
            yield chunk


async def _replay(chunks: list[TokenChunk]) -> AsyncIterator[TokenChunk]:
    for chunk in chunks:
        yield chunk


async def collect(chunks: AsyncIterator[TokenChunk]) -> tuple[str, TokenChunk]:
    """Concatenate a stream's text; return it with the final chunk."""
    parts: list[str] = []
    last: TokenChunk | None = None
    async for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    if last is None or last.finish is None:
        raise FabricError("stream ended without a final chunk")
    return "".join(parts), last


def message_pairs(messages: Sequence[common_pb2.ChatMessage]) -> tuple[tuple[str, str], ...]:
    return tuple((m.role, m.content) for m in messages)

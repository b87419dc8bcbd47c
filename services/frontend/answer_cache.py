"""The frontend's side of the semantic cache: look up before scheduling,
replay a hit as a stream, store a complete answer after it streamed.

The cache never breaks serving: a lookup that fails or takes longer than
``timeout`` counts as a miss (logged), a failed store is logged and dropped.
Only deterministic requests (temperature 0 or a seed) use the cache unless
the caller opts in with ``allow_nondeterministic``; an answer is stored only
when its stream ended cleanly with STOP or LENGTH — never an error, a
cancelled or a cut-off stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import AsyncIterator

import grpc
from llmfabric.common.v1 import common_pb2
from llmfabric.convert import chunk_from_pb, chunk_to_pb
from llmfabric.runtime.context import outgoing_metadata
from llmfabric.runtime.errors import InvalidArgument, Unavailable
from llmfabric.runtime.upstream import Upstream
from llmfabric.semcache.keys import deterministic
from llmfabric.semcache.v1 import semcache_pb2, semcache_pb2_grpc
from llmfabric.structs import Finish, TokenChunk

log = logging.getLogger(__name__)

CONTROL_HEADER = "x-llmfabric-cache-control"  # request: skip, no-store, allow-nondeterministic (comma-separated)
THRESHOLD_HEADER = "x-llmfabric-cache-threshold"  # request: minimum similarity of a semantic hit
STATUS_HEADER = "x-llmfabric-cache"  # response: hit-exact | hit-semantic | miss | off
SIMILARITY_HEADER = "x-llmfabric-cache-similarity"  # response, on hits


@dataclasses.dataclass(frozen=True, slots=True)
class CacheControl:
    """Per-request cache controls (API fields or headers)."""

    skip: bool = False  # no lookup
    no_store: bool = False  # do not store the answer
    allow_nondeterministic: bool = False  # use the cache although temperature > 0 and no seed
    threshold: float = 0.0  # semantic-hit similarity; 0 = the cache's default

    @classmethod
    def parse(cls, control: str | None, threshold: str | None, fields=None) -> CacheControl:
        """Merge header values with an ``inference.v1.CacheControl`` message (either may be empty)."""
        words = {w.strip().lower() for w in (control or "").split(",") if w.strip()}
        unknown = words - {"skip", "no-store", "allow-nondeterministic"}
        if unknown:
            raise InvalidArgument(CONTROL_HEADER, f"unknown directive(s) {sorted(unknown)}; use skip, no-store, allow-nondeterministic")
        thr = fields.threshold if fields is not None else 0.0
        if threshold:
            try:
                thr = float(threshold)
            except ValueError:
                raise InvalidArgument(THRESHOLD_HEADER, f"not a number: {threshold!r}") from None
        if not 0.0 <= thr <= 1.0:
            raise InvalidArgument("options.cache.threshold" if not threshold else THRESHOLD_HEADER, f"must be in (0, 1], got {thr}")
        f = fields
        return cls(
            skip="skip" in words or bool(f and f.skip),
            no_store="no-store" in words or bool(f and f.no_store),
            allow_nondeterministic="allow-nondeterministic" in words or bool(f and f.allow_nondeterministic),
            threshold=thr,
        )


class CacheStatus(str, enum.Enum):
    OFF = "off"  # not consulted
    MISS = "miss"
    HIT_EXACT = "hit-exact"
    HIT_SEMANTIC = "hit-semantic"


_STATUS_PB = {CacheStatus.OFF: 0, CacheStatus.MISS: 1, CacheStatus.HIT_EXACT: 2, CacheStatus.HIT_SEMANTIC: 3}


@dataclasses.dataclass(frozen=True, slots=True)
class CacheOutcome:
    """What the cache said about one request."""

    status: CacheStatus = CacheStatus.OFF
    similarity: float = 0.0  # of the hit
    entry_id: str = ""  # of the hit

    @property
    def hit(self) -> bool:
        return self.status in (CacheStatus.HIT_EXACT, CacheStatus.HIT_SEMANTIC)

    def headers(self) -> dict[str, str]:
        out = {STATUS_HEADER: self.status.value}
        if self.hit:
            out[SIMILARITY_HEADER] = f"{self.similarity:.4f}"
        return out

    def to_pb_fields(self) -> dict:
        return {"status": _STATUS_PB[self.status], "similarity": self.similarity, "entry_id": self.entry_id}


class AnswerCache:
    """gRPC client of the SemanticCacheService."""

    def __init__(self, target: str, timeout: float = 0.25, *, consul_url: str = "") -> None:
        """``target``: ``host:port[,...]`` or ``consul:<service>``."""
        self._caches = Upstream("semcache", target, semcache_pb2_grpc.SemanticCacheServiceStub, consul_url=consul_url)
        self.timeout = timeout
        self._pending: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self._caches.start()

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=5)
        await self._caches.close()

    @staticmethod
    def usable(key: semcache_pb2.CacheKey, control: CacheControl) -> bool:
        """A question to key on (the last message is the user's) and a repeatable answer (or the caller's opt-in)."""
        question = key.messages[-1].content if key.messages and key.messages[-1].role == "user" else key.prompt
        return bool(question.strip()) and (deterministic(key.sampling) or control.allow_nondeterministic)

    async def lookup(self, key: semcache_pb2.CacheKey, control: CacheControl) -> tuple[CacheOutcome, list[TokenChunk] | None]:
        if control.skip or not self.usable(key, control):
            return CacheOutcome(), None
        try:
            r = await self._caches.stub().Lookup(semcache_pb2.LookupRequest(key=key, threshold=control.threshold),
                                        timeout=self.timeout, metadata=outgoing_metadata())
        except (grpc.aio.AioRpcError, Unavailable) as err:
            log.warning("semantic cache lookup failed; answering from the model", extra=_why(err))
            return CacheOutcome(CacheStatus.MISS), None
        if r.hit == semcache_pb2.HIT_KIND_UNSPECIFIED or not r.chunks:
            return CacheOutcome(CacheStatus.MISS), None
        status = CacheStatus.HIT_EXACT if r.hit == semcache_pb2.HIT_KIND_EXACT else CacheStatus.HIT_SEMANTIC
        chunks = [chunk_from_pb(c) for c in r.chunks]
        last = chunks[-1]
        if last.usage is not None:  # every prompt token was served from the cache
            chunks[-1] = dataclasses.replace(last, usage=dataclasses.replace(last.usage, cached_tokens=last.usage.prompt_tokens))
        return CacheOutcome(status, r.similarity, r.entry_id), chunks

    async def recording(self, key: semcache_pb2.CacheKey, control: CacheControl,
                        chunks: AsyncIterator[TokenChunk]) -> AsyncIterator[TokenChunk]:
        """Pass ``chunks`` through; store them once the stream finished cleanly."""
        got: list[TokenChunk] = []
        async for chunk in chunks:
            got.append(chunk)
            yield chunk
        # Only reached when the stream ran to its end: an error raised out of the
        # loop, and a consumer that went away closed us at the yield above.
        if got and got[-1].finish in (Finish.STOP, Finish.LENGTH) and not control.no_store and self.usable(key, control):
            task = asyncio.create_task(self._store(key, control, got))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _store(self, key: semcache_pb2.CacheKey, control: CacheControl, chunks: list[TokenChunk]) -> None:
        req = semcache_pb2.StoreRequest(key=key, chunks=[chunk_to_pb(c) for c in chunks],
                                        allow_nondeterministic=control.allow_nondeterministic)
        try:
            r = await self._caches.stub().Store(req, timeout=max(1.0, 4 * self.timeout), metadata=outgoing_metadata())
            if not r.stored:
                log.info("answer not cached", extra={"reason": r.reason})
        except (grpc.aio.AioRpcError, Unavailable) as err:
            log.warning("semantic cache store failed", extra=_why(err))


def _why(err: Exception) -> dict:
    if isinstance(err, grpc.aio.AioRpcError):
        return {"code": err.code().name, "reason": err.details()}
    return {"code": "UNAVAILABLE", "reason": str(err)}


def cache_key(model: str, tenant_id: str, cache_salt: str, messages, prompt: str | None,
              sampling: common_pb2.SamplingParams) -> semcache_pb2.CacheKey:
    key = semcache_pb2.CacheKey(model=model, tenant=common_pb2.Tenant(id=tenant_id, cache_salt=cache_salt), sampling=sampling)
    if messages is not None:
        key.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in messages)
    else:
        key.prompt = prompt or ""
    return key

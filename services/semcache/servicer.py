"""gRPC methods of llmfabric.semcache.v1.SemanticCacheService (thin: the
logic is in keys.py, policy.py and store.py)."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Awaitable, Callable

import numpy as np

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import InvalidArgument, Unavailable
from llmfabric.semcache.v1 import semcache_pb2, semcache_pb2_grpc

from .keys import KeyParts, deterministic, key_parts
from .metrics import SemcacheMetrics
from .store import AnswerStore, Hit

SERVICE_NAME = semcache_pb2.DESCRIPTOR.services_by_name["SemanticCacheService"].full_name
STORABLE = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
RECENT_VECTORS = 4096  # embeddings of recent lookups, reused when the answer is stored


class SemcacheServicer(semcache_pb2_grpc.SemanticCacheServiceServicer):
    def __init__(self) -> None:
        self.store: AnswerStore | None = None  # set once the embedder is loaded
        self.embed: Callable[[str], Awaitable[np.ndarray]] | None = None
        self.metrics: SemcacheMetrics | None = None
        self._recent: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()

    def _ready(self) -> AnswerStore:
        if self.store is None or self.embed is None:
            raise Unavailable("semantic cache is still loading")
        return self.store

    async def _vector(self, parts: KeyParts) -> np.ndarray:
        v = self._recent.pop(parts.exact, None)
        if v is None:
            v = await self.embed(parts.query)
        self._recent[parts.exact] = v
        while len(self._recent) > RECENT_VECTORS:
            self._recent.popitem(last=False)
        return v

    async def Lookup(self, request, context):
        store, t0 = self._ready(), time.perf_counter()
        parts = key_parts(request.key)
        if not (0.0 <= request.threshold <= 1.0) or math.isnan(request.threshold):
            raise InvalidArgument("threshold", f"must be in (0, 1] (0 = the server default), got {request.threshold}")
        hit = store.lookup_exact(parts)
        if hit is None:
            hit = store.lookup_semantic(parts, await self._vector(parts), request.threshold or None)
        self._observe(hit, time.perf_counter() - t0)
        if hit is None:
            return semcache_pb2.LookupResponse()
        e = hit.entry
        return semcache_pb2.LookupResponse(
            hit=semcache_pb2.HIT_KIND_EXACT if hit.exact else semcache_pb2.HIT_KIND_SEMANTIC,
            similarity=hit.similarity,
            chunks=semcache_pb2.CachedAnswer.FromString(e.payload).chunks,
            entry_id=str(e.id),
            age_seconds=max(0.0, store.clock() - e.created),
            matched_query=e.query,
        )

    async def Store(self, request, context):
        store = self._ready()
        parts = key_parts(request.key)
        if not request.chunks:
            raise InvalidArgument("chunks", "the answer is empty")
        if request.ttl_seconds < 0:
            raise InvalidArgument("ttl_seconds", f"must be >= 0 (0 = the server default), got {request.ttl_seconds}")
        finish = request.chunks[-1].finish_reason
        reason = ""
        if finish not in STORABLE:
            reason = f"finish reason {common_pb2.FinishReason.Name(finish)}: only complete answers (STOP, LENGTH) are stored"
        elif any(c.finish_reason for c in request.chunks[:-1]):
            raise InvalidArgument("chunks", "only the last chunk may carry a finish reason")
        elif not (deterministic(request.key.sampling) or request.allow_nondeterministic):
            reason = "decoding is not deterministic (temperature > 0 without a seed) and allow_nondeterministic is not set"
        if reason:
            self.metrics.stores.labels("skipped").inc()
            return semcache_pb2.StoreResponse(stored=False, reason=reason)
        payload = semcache_pb2.CachedAnswer(chunks=request.chunks).SerializeToString()
        if len(payload) > store.max_bytes:
            self.metrics.stores.labels("too_large").inc()
            return semcache_pb2.StoreResponse(stored=False, reason=f"answer of {len(payload)} bytes exceeds the cache's memory bound")
        entry = store.put(parts, await self._vector(parts), payload, float(request.ttl_seconds) or None)
        self.metrics.stores.labels("stored").inc()
        return semcache_pb2.StoreResponse(stored=True, entry_id=str(entry.id))

    async def Invalidate(self, request, context):
        store = self._ready()
        if request.older_than_seconds < 0:
            raise InvalidArgument("older_than_seconds", f"must be >= 0, got {request.older_than_seconds}")
        if request.entry_id:
            if not request.entry_id.isdigit():
                raise InvalidArgument("entry_id", f"not an entry id: {request.entry_id!r}")
            return semcache_pb2.InvalidateResponse(removed=store.invalidate(entry_id=int(request.entry_id)))
        has_ns = request.HasField("key_namespace")
        if not has_ns and not request.older_than_seconds:
            raise InvalidArgument("entry_id", "give entry_id, key_namespace or older_than_seconds")
        ns = request.key_namespace
        removed = store.invalidate(model=ns.model if has_ns else None, tenant=ns.tenant.id if has_ns else None,
                                   older_than=float(request.older_than_seconds))
        return semcache_pb2.InvalidateResponse(removed=removed)

    async def GetStats(self, request, context):
        store = self._ready()
        c = store.counters
        return semcache_pb2.GetStatsResponse(
            entries=len(store), bytes=store.bytes, exact_hits=c.exact_hits, semantic_hits=c.semantic_hits,
            misses=c.misses, evictions=c.evictions, expirations=c.expirations, namespaces=store.namespaces,
        )

    def _observe(self, hit: Hit | None, seconds: float) -> None:
        if self.metrics is None:
            return
        self.metrics.latency.observe(seconds)
        result = "miss" if hit is None else ("hit_exact" if hit.exact else "hit_semantic")
        self.metrics.lookups.labels(result).inc()
        if hit is not None and not hit.exact:
            self.metrics.similarity.observe(hit.similarity)

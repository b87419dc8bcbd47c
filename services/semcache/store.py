"""The answer store: entries, their two tiers, TTL and the memory bound.

Knows nothing of gRPC or embeddings models: the caller embeds the query
(off the event loop) and hands over opaque answer payloads. One vector index
per namespace (``index.py``), so a semantic search never sees another
tenant's, model's, system prompt's or parameter set's entries.

Bounds: at most ``max_entries`` entries and ``max_bytes`` bytes (payload,
query, vector and a fixed per-entry overhead); beyond either the least
recently used entries go (counted as evictions). Expired entries are dropped
when a lookup meets them and by ``expire()`` sweeps (counted as
expirations).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable

import numpy as np

from .index import IndexKind, VectorIndex, create_index
from .keys import KeyParts
from .policy import HitPolicy

ENTRY_OVERHEAD = 800  # bytes per entry beyond its data: dicts, the dataclass, HNSW links (~300, bench_index.py)


@dataclasses.dataclass(slots=True, eq=False)
class Entry:
    """One stored answer."""

    id: int  # entry id (positive int64)
    namespace: bytes  # KeyParts.namespace
    exact: bytes  # KeyParts.exact
    query: str  # normalised question
    model: str  # for invalidation
    tenant: str  # for invalidation
    vector: np.ndarray  # L2-normalised query embedding (float32)
    payload: bytes  # the answer, opaque here
    created: float  # wall-clock seconds
    expires: float  # wall-clock seconds

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.query.encode()) + 2 * self.vector.nbytes + ENTRY_OVERHEAD  # the index keeps a copy


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry
    similarity: float  # 1.0 for exact hits
    exact: bool


@dataclasses.dataclass(slots=True)
class Counters:
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0


class AnswerStore:
    """Exact + per-namespace semantic tiers with TTL and an LRU memory bound."""

    def __init__(
        self,
        *,
        dim: int,
        policy: HitPolicy,
        max_entries: int = 100_000,
        max_bytes: int = 512 * 1024 * 1024,
        default_ttl: float = 86_400.0,
        index_kind: IndexKind | str = IndexKind.AUTO,
        clock: Callable[[], float] = time.time,
        candidates: int = 4,
    ) -> None:
        self.dim, self.policy = dim, policy
        self.max_entries, self.max_bytes, self.default_ttl = max_entries, max_bytes, default_ttl
        self.index_kind, self.clock, self.candidates = IndexKind(index_kind), clock, candidates
        self.counters = Counters()
        self.bytes = 0
        self._lru: collections.OrderedDict[int, Entry] = collections.OrderedDict()  # oldest first
        self._exact: dict[bytes, Entry] = {}
        self._indexes: dict[bytes, VectorIndex] = {}
        self._ids = itertools.count(1)
        self.changed = 0  # mutations since start (the snapshotter compares it)

    # ------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._lru)

    @property
    def namespaces(self) -> int:
        return len(self._indexes)

    def entries(self) -> list[Entry]:
        """Every entry, least recently used first."""
        return list(self._lru.values())

    def lookup_exact(self, parts: KeyParts) -> Hit | None:
        e = self._exact.get(parts.exact)
        if e is None or not self._live(e):
            return None
        return self._hit(e, 1.0, exact=True)

    def lookup_semantic(self, parts: KeyParts, vector: np.ndarray, threshold: float | None = None) -> Hit | None:
        """Best live candidate in the namespace the policy accepts; counts a miss otherwise."""
        index = self._indexes.get(parts.namespace)
        if index is not None:
            for key, sim in index.search(vector, self.candidates):
                e = self._lru.get(key)
                if e is None or not self._live(e):
                    continue
                if self.policy.accepts(parts.query, e.query, sim, threshold):
                    return self._hit(e, min(float(sim), 1.0), exact=False)
        self.counters.misses += 1
        return None

    # ------------------------------------------------------------ writing
    def put(self, parts: KeyParts, vector: np.ndarray, payload: bytes, ttl: float | None = None,
            *, created: float | None = None, entry_id: int | None = None) -> Entry:
        """Store (or replace) the answer to ``parts``; evicts LRU entries beyond the bounds."""
        if vector.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},), got {vector.shape}")
        old = self._exact.get(parts.exact)
        if old is not None:
            self._remove(old)
        now = self.clock() if created is None else created
        e = Entry(entry_id or next(self._ids), parts.namespace, parts.exact, parts.query, parts.model, parts.tenant,
                  np.ascontiguousarray(vector, dtype=np.float32), payload, now, now + (ttl or self.default_ttl))
        if entry_id is not None:  # restored from a snapshot: keep new ids above it
            self._ids = itertools.count(max(entry_id + 1, next(self._ids)))
        self._lru[e.id] = e
        self._exact[e.exact] = e
        index = self._indexes.get(e.namespace)
        if index is None:
            index = self._indexes[e.namespace] = create_index(self.index_kind, self.dim)
        index.add(e.id, e.vector)
        self.bytes += e.size
        self.changed += 1
        while len(self._lru) > self.max_entries or (self.bytes > self.max_bytes and len(self._lru) > 1):
            self._remove(next(iter(self._lru.values())))
            self.counters.evictions += 1
        return e

    def invalidate(self, *, entry_id: int = 0, model: str | None = None, tenant: str | None = None,
                   older_than: float = 0.0) -> int:
        """Remove one entry by id, or every entry matching model/tenant/age filters (all given must match)."""
        if entry_id:
            e = self._lru.get(entry_id)
            victims: Iterable[Entry] = [e] if e is not None else []
        else:
            cutoff = self.clock() - older_than
            victims = [e for e in self._lru.values()
                       if (not model or e.model == model) and (tenant is None or e.tenant == tenant)
                       and (not older_than or e.created <= cutoff)]
        n = 0
        for e in list(victims):
            self._remove(e)
            n += 1
        return n

    def expire(self) -> int:
        """Drop every expired entry; returns how many."""
        now = self.clock()
        dead = [e for e in self._lru.values() if e.expires <= now]
        for e in dead:
            self._remove(e)
        self.counters.expirations += len(dead)
        return len(dead)

    # ------------------------------------------------------------ internals
    def _live(self, e: Entry) -> bool:
        if e.expires > self.clock():
            return True
        self._remove(e)
        self.counters.expirations += 1
        return False

    def _hit(self, e: Entry, similarity: float, *, exact: bool) -> Hit:
        self._lru.move_to_end(e.id)
        if exact:
            self.counters.exact_hits += 1
        else:
            self.counters.semantic_hits += 1
        return Hit(e, similarity, exact)

    def _remove(self, e: Entry) -> None:
        if self._lru.pop(e.id, None) is None:
            return
        if self._exact.get(e.exact) is e:
            del self._exact[e.exact]
        index = self._indexes.get(e.namespace)
        if index is not None:
            index.remove(e.id)
            if len(index) == 0:
                del self._indexes[e.namespace]
        self.bytes -= e.size
        self.changed += 1

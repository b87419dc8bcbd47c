"""Semantic cache Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .store import AnswerStore

SIMILARITY_BUCKETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)
LOOKUP_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.5)


class SemcacheMetrics:
    def __init__(self, registry: CollectorRegistry, store: AnswerStore) -> None:
        self.lookups = Counter("llmfabric_semcache_lookups", "Lookups by result (hit_exact, hit_semantic, miss)",
                               ["result"], registry=registry)
        self.similarity = Histogram("llmfabric_semcache_hit_similarity", "Cosine similarity of semantic hits",
                                    buckets=SIMILARITY_BUCKETS, registry=registry)
        self.latency = Histogram("llmfabric_semcache_lookup_seconds", "Lookup time, embedding included",
                                 buckets=LOOKUP_BUCKETS, registry=registry)
        self.stores = Counter("llmfabric_semcache_stores", "Store calls by result (stored or the reason not)",
                              ["result"], registry=registry)
        self.snapshots = Counter("llmfabric_semcache_snapshots", "Snapshots written", registry=registry)
        for name, doc, fn in (
            ("llmfabric_semcache_entries", "Entries held", lambda: len(store)),
            ("llmfabric_semcache_bytes", "Bytes held (answers, questions, vectors, bookkeeping)", lambda: store.bytes),
            ("llmfabric_semcache_namespaces", "Namespaces with entries", lambda: store.namespaces),
            ("llmfabric_semcache_evictions", "Entries evicted by the entry or memory bound since start",
             lambda: store.counters.evictions),
            ("llmfabric_semcache_expirations", "Entries dropped by TTL since start", lambda: store.counters.expirations),
        ):
            Gauge(name, doc, registry=registry).set_function(fn)

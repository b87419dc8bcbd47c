"""Semantic cache service settings (prefix ``LLMFABRIC_SEMCACHE_``)."""

from __future__ import annotations

import dataclasses

from llmfabric.runtime.config import ConfigError, ServerSettings, setting

from .index import IndexKind

PREFIX = "LLMFABRIC_SEMCACHE_"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemcacheConfig(ServerSettings):
    """Settings of the semantic cache service."""

    threshold: float = setting(0.82, help="default minimum cosine similarity of a semantic hit (chosen by loadtest/bench_semcache.py)")
    guard: bool = setting(True, help="semantic hits must also agree on numbers, negations, opposites and names")
    ttl_seconds: float = setting(86400.0, help="default time to live of an entry")
    max_entries: int = setting(100_000, help="entries kept; beyond it the least recently used go")
    max_bytes: int = setting(512 * 1024 * 1024, help="bytes kept (answers, questions, vectors, bookkeeping); LRU beyond it")
    snapshot_path: str = setting("", help="snapshot file ('' = $LLMFABRIC_CACHE_DIR/semcache/snapshot.bin, '-' = no persistence)")
    snapshot_interval: float = setting(30.0, help="seconds between snapshots when something changed (and one at shutdown)")
    index: str = setting("auto", help="vector index per namespace: auto (exact while small, then HNSW), exact or hnsw")
    embed_threads: int = setting(1, help="ONNX Runtime threads for query embeddings")
    embed_precision: str = setting("int8", help="query embedding model: int8 (MatMul weights quantized, ~2x faster) or fp32")
    onnx_path: str = setting("", help="MiniLM ONNX file ('' = the cached export of that precision from `make install`)")

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"{PREFIX}THRESHOLD={self.threshold}: must be in (0, 1]")
        for name in ("ttl_seconds", "snapshot_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)}: must be positive")
        for name in ("max_entries", "max_bytes", "embed_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)}: must be at least 1")
        if self.embed_precision not in ("int8", "fp32"):
            raise ConfigError(f"{PREFIX}EMBED_PRECISION={self.embed_precision!r}: must be int8 or fp32")
        kinds = [k.value for k in IndexKind]
        if self.index not in kinds:
            raise ConfigError(f"{PREFIX}INDEX={self.index!r}: must be one of {', '.join(kinds)}")

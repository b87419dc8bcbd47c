"""Semantic cache server assembly: the embedder, the store restored from its
snapshot, and a background task that expires entries and writes snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import time

import numpy as np

from llmfabric.runtime.config import cache_dir
from llmfabric.runtime.server import ServiceHost
from llmfabric.semcache.v1 import semcache_pb2_grpc

from . import persist
from .config import SemcacheConfig
from .keys import KeyParts
from .metrics import SemcacheMetrics
from .policy import HitPolicy
from .servicer import SERVICE_NAME, SemcacheServicer
from .store import AnswerStore

log = logging.getLogger(__name__)


def snapshot_file(cfg: SemcacheConfig) -> pathlib.Path | None:
    if cfg.snapshot_path == "-":
        return None
    return pathlib.Path(cfg.snapshot_path) if cfg.snapshot_path else cache_dir() / "semcache" / "snapshot.bin"


class SemcacheService:
    """The host, the servicer, and the store's lifecycle."""

    def __init__(self, cfg: SemcacheConfig, embedder=None) -> None:
        self.cfg = cfg
        self.host = ServiceHost("semcache", cfg)
        self.servicer = SemcacheServicer()
        self.host.add(SERVICE_NAME, semcache_pb2_grpc.add_SemanticCacheServiceServicer_to_server, self.servicer)
        self.embedder = embedder  # tests may inject one; else the ONNX MiniLM
        self.snapshot = snapshot_file(cfg)
        self._task: asyncio.Task | None = None
        self._saved = -1

    async def load(self) -> None:
        """Load the embedding model, restore the snapshot, start the housekeeping task."""
        if self.embedder is None:
            from .embedding import Embedder
            from .quantize import int8_path

            path = pathlib.Path(self.cfg.onnx_path) if self.cfg.onnx_path else (
                int8_path() if self.cfg.embed_precision == "int8" else None)
            self.embedder = await asyncio.to_thread(Embedder, path, threads=self.cfg.embed_threads)
        store = AnswerStore(
            dim=self.embedder.dim, policy=HitPolicy(self.cfg.threshold, self.cfg.guard), max_entries=self.cfg.max_entries,
            max_bytes=self.cfg.max_bytes, default_ttl=self.cfg.ttl_seconds, index_kind=self.cfg.index,
        )
        if self.snapshot is not None:
            restored = await asyncio.to_thread(lambda: list(persist.load(self.snapshot, time.time())))
            for e in restored:
                store.put(KeyParts(e.namespace, e.exact, e.query, e.model, e.tenant), e.vector, e.payload,
                          e.expires - e.created, created=e.created, entry_id=e.id)
            self._saved = store.changed
            log.info("semantic cache restored", extra={"entries": len(store), "path": str(self.snapshot)})
        embedder = self.embedder

        async def embed(text: str) -> np.ndarray:
            return (await asyncio.to_thread(embedder.embed, [text]))[0]

        self.servicer.metrics = SemcacheMetrics(self.host.registry, store)
        self.servicer.embed = embed
        self.servicer.store = store
        self._task = asyncio.create_task(self._housekeeping(), name="semcache-housekeeping")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.snapshot_interval)
            try:
                self.servicer.store.expire()
                await self.save()
            except Exception:  # noqa: BLE001 - a failed snapshot must not stop serving; retried next interval
                log.exception("semantic cache snapshot failed", extra={"path": str(self.snapshot)})

    async def save(self) -> None:
        """Write a snapshot if anything changed since the last one."""
        store = self.servicer.store
        if self.snapshot is None or store is None or store.changed == self._saved:
            return
        changed, entries = store.changed, store.entries()
        size = await asyncio.to_thread(persist.save, entries, self.snapshot)
        self._saved = changed
        self.servicer.metrics.snapshots.inc()
        log.info("semantic cache snapshot written", extra={"entries": len(entries), "bytes": size, "path": str(self.snapshot)})

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.save()


async def create_server(cfg: SemcacheConfig, embedder=None) -> tuple[SemcacheService, int]:
    """Start serving (NOT_SERVING until ``load`` finishes); returns the port."""
    svc = SemcacheService(cfg, embedder)
    port = await svc.host.start()
    return svc, port

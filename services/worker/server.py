"""Worker server assembly."""

from __future__ import annotations

import os

from llmfabric.models.catalog import default_model
from llmfabric.runtime.server import ServiceHost
from llmfabric.worker.v1 import worker_pb2_grpc

from .config import WorkerConfig
from .embedded import EmbeddedEngine
from .engine import Engine, EngineKind
from .metrics import WorkerMetrics
from .servicer import SERVICE_NAME, WorkerServicer


def create_engine(cfg: WorkerConfig) -> Engine:
    """The engine the config names."""
    kind = EngineKind(cfg.engine)
    if kind is EngineKind.EMBEDDED:
        return EmbeddedEngine(
            default_model(cfg.model_name or None),
            context_length=cfg.context_length,
            capacity=cfg.capacity,
            max_waiting=cfg.max_waiting,
            n_batch=cfg.n_batch,
            n_threads=cfg.n_threads,
            n_threads_batch=cfg.n_threads_batch or (os.cpu_count() or 1),
            weights=cfg.weights,
            prefill_chunk=cfg.prefill_chunk,
            prefix_cache=cfg.prefix_cache,
            cache_seqs=cfg.cache_seqs,
            preempt=cfg.preempt,
        )
    if kind is EngineKind.SGLANG:
        from .sglang import SGLangEngine

        return SGLangEngine(cfg)
    from .triton import TritonEngine

    return TritonEngine(cfg)


class WorkerService:
    """The host, the engine and the servicer."""

    def __init__(self, cfg: WorkerConfig, engine: Engine | None = None) -> None:
        self.cfg = cfg
        self.engine = engine or create_engine(cfg)
        self.host = ServiceHost("worker", cfg)
        self.servicer = WorkerServicer(self.engine, cfg.worker_id, WorkerMetrics(self.host.registry, self.engine))
        self.host.add(SERVICE_NAME, worker_pb2_grpc.add_WorkerServiceServicer_to_server, self.servicer)

    async def load(self) -> None:
        await self.engine.start()
        if not self.servicer.worker_id:
            self.servicer.worker_id = f"worker-{self.host.port}"

    def consul_meta(self) -> dict[str, str]:
        """What Consul lists about this worker (model, engine, capacity)."""
        info = self.engine.info
        return {"worker_id": self.servicer.worker_id, "model": info.model, "engine": str(info.kind.value),
                "capacity": str(info.capacity), "context_length": str(info.context_length)}

    async def close(self) -> None:
        await self.engine.stop()


async def create_server(cfg: WorkerConfig, engine: Engine | None = None) -> tuple[WorkerService, int]:
    """Start serving (NOT_SERVING until ``load`` finishes); returns the port."""
    svc = WorkerService(cfg, engine)
    port = await svc.host.start()
    return svc, port

"""Scheduler server assembly."""

from __future__ import annotations

from llmfabric.runtime.server import ServiceHost
from llmfabric.scheduler.v1 import scheduler_pb2_grpc

from .config import SchedulerConfig
from .discovery import Discovery, StaticDiscovery
from .dispatcher import Dispatcher
from .pool import WorkerPool
from .queue import RequestQueue
from .router import create_router
from .servicer import SERVICE_NAME, SchedulerServicer


class SchedulerService:
    """The host, the worker pool and the dispatcher."""

    def __init__(self, cfg: SchedulerConfig, discovery: Discovery | None = None) -> None:
        self.cfg = cfg
        self.pool = WorkerPool(discovery or StaticDiscovery(cfg.workers), probe_interval=cfg.probe_interval)
        self.dispatcher = Dispatcher(
            self.pool, RequestQueue(cfg.max_waiting), create_router(cfg.routing), max_retries=cfg.max_retries
        )
        self.host = ServiceHost("scheduler", cfg)
        self.host.add(
            SERVICE_NAME, scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, SchedulerServicer(self.dispatcher)
        )

    async def load(self) -> None:
        """Connect to the workers and probe them once."""
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()


async def create_server(cfg: SchedulerConfig, discovery: Discovery | None = None) -> tuple[SchedulerService, int]:
    svc = SchedulerService(cfg, discovery)
    port = await svc.host.start()
    return svc, port

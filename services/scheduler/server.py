"""Scheduler server assembly."""

from __future__ import annotations

from llmfabric.runtime.server import ServiceHost
from llmfabric.scheduler.v1 import scheduler_pb2_grpc

from .config import SchedulerConfig
from .discovery import Discovery, from_config
from .dispatcher import Dispatcher
from .metrics import SchedulerMetrics
from .pool import WorkerPool
from .queue import QueuePolicy, RequestQueue
from .router import create_router
from .servicer import SERVICE_NAME, SchedulerServicer


class SchedulerService:
    """The host, the worker pool and the dispatcher."""

    def __init__(self, cfg: SchedulerConfig, discovery: Discovery | None = None) -> None:
        self.cfg = cfg
        self.pool = WorkerPool(
            discovery or from_config(cfg.workers, cfg.consul), probe_interval=cfg.probe_interval,
            breaker_failures=cfg.breaker_failures, breaker_cooldown=cfg.breaker_cooldown,
        )
        self.dispatcher = Dispatcher(
            self.pool,
            RequestQueue(policy=QueuePolicy(
                max_waiting=cfg.max_waiting, max_waiting_tokens=cfg.max_waiting_tokens, aging_rate=cfg.aging_rate,
                tenant_weights=cfg.weights(),
            )),
            create_router(
                cfg.routing, cache_threshold=cfg.cache_threshold, balance_abs_threshold=cfg.balance_abs_threshold,
                balance_rel_threshold=cfg.balance_rel_threshold, tree_tokens=cfg.tree_tokens,
            ),
            max_retries=cfg.max_retries,
            priority_caps=cfg.priority_caps(),
            reserved_slots=cfg.reserved_slots,
        )
        self.host = ServiceHost("scheduler", cfg)
        self.dispatcher.metrics = SchedulerMetrics(self.host.registry, self.dispatcher.queue)
        self.dispatcher.policy_name = cfg.routing
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

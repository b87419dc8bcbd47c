"""Scheduler Prometheus metrics: queues per level, outcomes, routing, latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmfabric.runtime.metrics import LATENCY_BUCKETS
from llmfabric.structs import LEVEL_NAMES

from .queue import RequestQueue


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry, queue: RequestQueue) -> None:
        depth = Gauge("llmfabric_scheduler_queue_depth", "Requests waiting, per priority level", ["level"], registry=registry)
        for level, name in LEVEL_NAMES.items():
            depth.labels(name).set_function(lambda level=level: queue.depth(level))
        self.wait = Histogram(
            "llmfabric_scheduler_queue_wait_seconds", "Time from admission to dispatch", ["level"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.outcomes = Counter(
            "llmfabric_scheduler_requests",
            "Requests by level and outcome (admitted, rejected, expired, cancelled, completed, failed)",
            ["level", "outcome"], registry=registry,
        )
        self.routing = Counter(
            "llmfabric_scheduler_routing_decisions", "Dispatch decisions by policy and reason", ["policy", "reason"],
            registry=registry,
        )
        self.in_flight = Gauge("llmfabric_scheduler_worker_in_flight", "Requests running per worker", ["worker"], registry=registry)
        self.ttft = Histogram(
            "llmfabric_scheduler_time_to_first_token_seconds", "Admission to first chunk", ["level"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.e2e = Histogram(
            "llmfabric_scheduler_request_duration_seconds", "Admission to last chunk", ["level"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )

    def outcome(self, level: int, outcome: str) -> None:
        self.outcomes.labels(LEVEL_NAMES.get(level, "interactive"), outcome).inc()

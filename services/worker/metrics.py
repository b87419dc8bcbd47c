"""Worker Prometheus metrics: request outcomes, tokens, latency, load."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmfabric.runtime.metrics import LATENCY_BUCKETS

from .engine import Engine


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, engine: Engine) -> None:
        self.requests = Counter(
            "llmfabric_worker_requests", "Finished requests by finish reason (cancelled = caller went away)",
            ["finish_reason"], registry=registry,
        )
        self.prompt_tokens = Counter("llmfabric_worker_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generated_tokens = Counter("llmfabric_worker_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram(
            "llmfabric_worker_time_to_first_token_seconds", "Request arrival to first token", buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "llmfabric_worker_request_duration_seconds", "Request arrival to last token", buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        running = Gauge("llmfabric_worker_running", "Sequences generating", registry=registry)
        waiting = Gauge("llmfabric_worker_waiting", "Sequences waiting for a slot", registry=registry)
        kv_used = Gauge("llmfabric_worker_kv_cells_used", "KV cache cells in use", registry=registry)
        running.set_function(lambda: engine.load().running)
        waiting.set_function(lambda: engine.load().waiting)
        kv_used.set_function(lambda: engine.load().kv_used)

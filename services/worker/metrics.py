"""Worker Prometheus metrics: request outcomes, tokens, latency, load."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmfabric.runtime.metrics import LATENCY_BUCKETS

from .engine import Engine

# Inter-token gaps: a CPU decode step is ~5-50 ms, a GPU one ~5-20 ms.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, engine: Engine) -> None:
        self.requests = Counter(
            "llmfabric_worker_requests", "Finished requests by finish reason (cancelled = caller went away)",
            ["finish_reason"], registry=registry,
        )
        self.prompt_tokens = Counter("llmfabric_worker_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.cached_tokens = Counter(
            "llmfabric_worker_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=registry
        )
        self.generated_tokens = Counter("llmfabric_worker_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram(
            "llmfabric_worker_time_to_first_token_seconds", "Request arrival to first token", buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "llmfabric_worker_inter_token_seconds", "Time between consecutive generated tokens (inter-token latency)",
            buckets=ITL_BUCKETS, registry=registry,
        )
        self.e2e = Histogram(
            "llmfabric_worker_request_duration_seconds", "Request arrival to last token", buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        running = Gauge("llmfabric_worker_running", "Sequences generating", registry=registry)
        waiting = Gauge("llmfabric_worker_waiting", "Sequences waiting for a slot", registry=registry)
        kv_used = Gauge("llmfabric_worker_kv_cells_used", "KV cache cells in use", registry=registry)
        kv_free = Gauge("llmfabric_worker_kv_cells_free", "KV cache cells free", registry=registry)
        evictions = Gauge("llmfabric_worker_cache_evictions", "Prefix-cache nodes evicted since start", registry=registry)
        running.set_function(lambda: engine.load().running)
        waiting.set_function(lambda: engine.load().waiting)
        kv_used.set_function(lambda: engine.load().kv_used)
        kv_free.set_function(lambda: engine.load().kv_free)
        evictions.set_function(lambda: engine.load().evictions_total)
        preempted = Gauge(
            "llmfabric_worker_preempted_steps",
            "Batch-only decode steps aborted for a critical/interactive arrival since start (embedded engine)",
            registry=registry,
        )
        preempted.set_function(lambda: getattr(engine, "preempted_steps", 0))

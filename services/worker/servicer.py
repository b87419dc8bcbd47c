"""gRPC methods of llmfabric.worker.v1.WorkerService."""

from __future__ import annotations

import logging
import time

from llmfabric.convert import chunk_to_pb, request_from_pb
from llmfabric.runtime.errors import InvalidArgument
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc

from .engine import Engine
from .metrics import WorkerMetrics

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: Engine, worker_id: str, metrics: WorkerMetrics | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.metrics = metrics

    async def Generate(self, request, context):
        req = request_from_pb(request.request)
        if not req.prompt_token_ids:
            raise InvalidArgument("request.prompt_token_ids", "must not be empty")
        if req.sampling.max_tokens < 1:
            raise InvalidArgument("request.sampling.max_tokens", "must be at least 1")
        if len(req.prompt_token_ids) + req.sampling.max_tokens > self.engine.info.context_length:
            raise InvalidArgument(
                "request.sampling.max_tokens",
                f"prompt + max_tokens exceeds this worker's context of {self.engine.info.context_length}",
            )
        start, first, finish = time.perf_counter(), True, "cancelled"
        last = start
        try:
            async for chunk in self.engine.generate(req):
                if self.metrics is not None and chunk.token_ids:
                    now = time.perf_counter()
                    if first:
                        self.metrics.ttft.observe(now - start)
                        first = False
                    else:  # the gap shared by the tokens this chunk brings (usually one)
                        gap = (now - last) / len(chunk.token_ids)
                        for _ in chunk.token_ids:
                            self.metrics.itl.observe(gap)
                    last = now
                if chunk.finish is not None:
                    finish = chunk.finish.value
                    if self.metrics is not None and chunk.usage is not None:
                        self.metrics.prompt_tokens.inc(chunk.usage.prompt_tokens)
                        self.metrics.cached_tokens.inc(chunk.usage.cached_tokens)
                        self.metrics.generated_tokens.inc(chunk.usage.completion_tokens)
                yield worker_pb2.GenerateResponse(chunk=chunk_to_pb(chunk))
        except Exception:
            finish = "error"
            raise
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels(finish).inc()
                self.metrics.e2e.observe(time.perf_counter() - start)
            if finish == "cancelled":
                log.info("generation cancelled by the caller", extra={"request": req.request_id})

    async def GetLoad(self, request, context):
        ld = self.engine.load()
        return worker_pb2.GetLoadResponse(
            running=ld.running,
            waiting=ld.waiting,
            capacity=ld.capacity,
            kv_used=ld.kv_used,
            kv_free=ld.kv_free,
            prompt_tokens_total=ld.prompt_tokens_total,
            cached_tokens_total=ld.cached_tokens_total,
            evictions_total=ld.evictions_total,
        )

    async def GetInfo(self, request, context):
        info = self.engine.info
        return worker_pb2.GetInfoResponse(
            worker_id=self.worker_id,
            model=info.model,
            engine=info.kind.value,
            context_length=info.context_length,
            capacity=info.capacity,
        )

    async def FlushCache(self, request, context):
        return worker_pb2.FlushCacheResponse(tokens_flushed=await self.engine.flush_cache())

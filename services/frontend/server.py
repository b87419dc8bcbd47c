"""Frontend server assembly: the gRPC Inference API and the OpenAI HTTP
API in one process, sharing one pipeline."""

from __future__ import annotations

import logging

from aiohttp import web
from llmfabric.inference.v1 import inference_pb2_grpc
from llmfabric.runtime.server import ServiceHost

from .answer_cache import AnswerCache
from .config import FrontendConfig
from .openai_api import OpenAIApi
from .pipeline import Pipeline
from .servicer import SERVICE_NAME, InferenceServicer

log = logging.getLogger(__name__)


class FrontendService:
    def __init__(self, cfg: FrontendConfig) -> None:
        self.cfg = cfg
        cache = AnswerCache(cfg.semcache, cfg.cache_timeout, consul_url=cfg.consul) if cfg.semcache else None
        self.pipeline = Pipeline(cfg.tokenizer, cfg.scheduler, cache, consul_url=cfg.consul)
        self.host = ServiceHost("frontend", cfg)
        self.host.add(SERVICE_NAME, inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(self.pipeline))
        self._runner: web.AppRunner | None = None
        self.http_port = 0

    async def start_http(self) -> int:
        self._runner = web.AppRunner(OpenAIApi(self.pipeline).app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.http_port, shutdown_timeout=self.cfg.drain_seconds)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("openai http listening", extra={"address": f"{self.cfg.host}:{self.http_port}"})
        return self.http_port

    async def load(self) -> None:
        """HTTP up, then wait for the tokenizer (models) before SERVING."""
        await self.start_http()
        await self.pipeline.connect()

    def consul_meta(self) -> dict[str, str]:
        """The OpenAI HTTP port rides along: the edge's control plane routes /v1/ there."""
        return {"http_port": str(self.http_port)}

    async def drain_also(self) -> None:
        """Stop accepting HTTP and let in-flight requests finish (drain_seconds)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        await self.drain_also()
        await self.pipeline.close()


async def create_server(cfg: FrontendConfig) -> tuple[FrontendService, int]:
    svc = FrontendService(cfg)
    port = await svc.host.start()
    return svc, port

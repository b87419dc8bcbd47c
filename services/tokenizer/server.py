"""Tokenizer server assembly."""

from __future__ import annotations

import asyncio

from llmfabric.models.catalog import default_model
from llmfabric.models.gguf import GgufModel
from llmfabric.runtime.server import ServiceHost
from llmfabric.tokenizer.v1 import tokenizer_pb2_grpc

from .config import TokenizerConfig
from .prepare import Preparer
from .servicer import SERVICE_NAME, TokenizerServicer
from .validation import Limits


class TokenizerService:
    """The host, the servicer and how to load the vocabulary."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        self.cfg = cfg
        self.host = ServiceHost("tokenizer", cfg)
        self.servicer = TokenizerServicer()
        self.host.add(SERVICE_NAME, tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, self.servicer)

    async def load(self) -> None:
        """Open the GGUF vocabulary (no weights) and build the preparer."""
        spec = default_model(self.cfg.model_name or None)
        model = await asyncio.to_thread(GgufModel, spec.path, vocab_only=True)
        limits = Limits(
            context_length=self.cfg.context_length,
            max_request_bytes=self.cfg.max_request_bytes,
            default_max_tokens=self.cfg.default_max_tokens,
        )
        self.servicer.preparer = Preparer(spec, model, limits)

    async def close(self) -> None:
        if self.servicer.preparer is not None:
            self.servicer.preparer.model.close()


async def create_server(cfg: TokenizerConfig) -> tuple[TokenizerService, int]:
    """Start serving (NOT_SERVING until ``load`` finishes); returns the port."""
    svc = TokenizerService(cfg)
    port = await svc.host.start()
    return svc, port

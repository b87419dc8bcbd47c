"""The engine interface every worker backend implements.

An engine takes ValidatedRequests and yields TokenChunks. Closing the
generator (the caller went away, a deadline passed) must stop generation and
free the sequence's resources. ``load()`` is cheap and thread-safe: the
scheduler polls it to route and admit.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import AsyncIterator
from typing import Protocol

from llmfabric.structs import TokenChunk, ValidatedRequest


class EngineKind(str, enum.Enum):
    """Which backend a worker fronts."""

    EMBEDDED = "embedded"  # llama.cpp in this process (CPU)
    SGLANG = "sglang"  # an SGLang server's native HTTP API
    TRITON = "triton"  # a Triton server with a decoupled LLM model (vLLM backend tensor names)


@dataclasses.dataclass(frozen=True, slots=True)
class EngineInfo:
    """Static facts about an engine."""

    kind: EngineKind  # backend
    model: str  # served model name
    context_length: int  # per-request window (prompt + max_tokens)
    capacity: int  # sequences decoded concurrently


@dataclasses.dataclass(frozen=True, slots=True)
class EngineLoad:
    """A point-in-time load report."""

    running: int  # sequences generating
    waiting: int  # admitted, not yet running
    capacity: int  # concurrent sequences
    kv_used: int  # KV cells in use
    kv_free: int  # KV cells free
    prompt_tokens_total: int  # prompt tokens processed since start
    cached_tokens_total: int  # of which served from the prefix cache
    evictions_total: int  # prefix-cache evictions


class Engine(Protocol):
    """What the worker servicer needs from a backend."""

    info: EngineInfo

    async def start(self) -> None:
        """Load the model; return when ready to generate."""

    async def stop(self) -> None:
        """Abort everything and release resources."""

    def generate(self, request: ValidatedRequest) -> AsyncIterator[TokenChunk]:
        """Stream the answer; the last chunk has ``finish`` and ``usage``."""

    def load(self) -> EngineLoad:
        """Current load."""

    async def flush_cache(self) -> int:
        """Drop unused cached prefixes; return the tokens dropped."""

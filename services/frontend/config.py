"""Frontend settings (prefix ``LLMFABRIC_FRONTEND_``)."""

from __future__ import annotations

import dataclasses

from llmfabric.runtime.config import ConfigError, ServerSettings, setting

PREFIX = "LLMFABRIC_FRONTEND_"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FrontendConfig(ServerSettings):
    """Settings of the frontend."""

    http_port: int = setting(0, help="OpenAI-compatible HTTP port (0 picks a free one)")
    tokenizer: str = setting(help="tokenizer service host:port")
    scheduler: str = setting(help="scheduler service host:port")
    semcache: str = setting("", help="semantic cache service host:port ('' = no answer cache)")
    cache_timeout: float = setting(0.25, help="seconds a cache lookup may take before the request goes to the model")

    def validate(self) -> None:
        for name in ("tokenizer", "scheduler", "semcache"):
            if name == "semcache" and not self.semcache:
                continue
            host, sep, port = getattr(self, name).rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)!r}: expected host:port")
        if self.cache_timeout <= 0:
            raise ConfigError(f"{PREFIX}CACHE_TIMEOUT={self.cache_timeout}: must be positive")

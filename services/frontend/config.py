"""Frontend settings (prefix ``LLMFABRIC_FRONTEND_``)."""

from __future__ import annotations

import dataclasses

from llmfabric.runtime.config import ConfigError, ServerSettings, setting
from llmfabric.runtime.upstream import config_target

PREFIX = "LLMFABRIC_FRONTEND_"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FrontendConfig(ServerSettings):
    """Settings of the frontend."""

    http_port: int = setting(0, help="OpenAI-compatible HTTP port (0 picks a free one)")
    tokenizer: str = setting(help="tokenizer: host:port[,...] or consul:<service>")
    scheduler: str = setting(help="scheduler: host:port[,...] or consul:<service>")
    semcache: str = setting("", help="semantic cache: host:port[,...] or consul:<service> ('' = no answer cache)")
    cache_timeout: float = setting(0.25, help="seconds a cache lookup may take before the request goes to the model")

    def validate(self) -> None:
        for name in ("tokenizer", "scheduler", "semcache"):
            value = getattr(self, name)
            if name == "semcache" and not value:
                continue
            config_target(PREFIX, name, value, self.consul)
        if self.cache_timeout <= 0:
            raise ConfigError(f"{PREFIX}CACHE_TIMEOUT={self.cache_timeout}: must be positive")

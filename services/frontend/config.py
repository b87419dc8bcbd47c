"""Frontend settings (prefix ``LLMFABRIC_FRONTEND_``)."""

from __future__ import annotations

import dataclasses

from llmfabric.runtime.config import ConfigError, ServerSettings, setting
from llmfabric.runtime.upstream import parse_target

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
            try:
                target = parse_target(value, f"{PREFIX}{name.upper()}")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if target.consul_service and not self.consul:
                raise ConfigError(f"{PREFIX}{name.upper()}={value!r} needs {PREFIX}CONSUL (the agent's address)")
        if self.cache_timeout <= 0:
            raise ConfigError(f"{PREFIX}CACHE_TIMEOUT={self.cache_timeout}: must be positive")

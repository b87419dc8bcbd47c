"""Scheduler service settings (prefix ``LLMFABRIC_SCHEDULER_``)."""

from __future__ import annotations

import dataclasses

from llmfabric.runtime.config import ConfigError, ServerSettings, setting

from .router import RoutingPolicy

PREFIX = "LLMFABRIC_SCHEDULER_"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig(ServerSettings):
    """Settings of the scheduler."""

    workers: tuple[str, ...] = setting((), help="comma-separated worker host:port list (static discovery)")
    routing: str = setting("least_load", help="routing policy: round_robin or least_load")
    max_waiting: int = setting(256, help="requests allowed to wait for a worker slot before RESOURCE_EXHAUSTED")
    max_retries: int = setting(1, help="retries on another worker when one fails before the first token")
    probe_interval: float = setting(1.0, help="seconds between worker load/health probes")

    def validate(self) -> None:
        if not self.workers:
            raise ConfigError(f"{PREFIX}WORKERS is required: comma-separated worker host:port addresses")
        for addr in self.workers:
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"{PREFIX}WORKERS: {addr!r} is not host:port")
        policies = [p.value for p in RoutingPolicy]
        if self.routing not in policies:
            raise ConfigError(f"{PREFIX}ROUTING={self.routing!r}: must be one of {', '.join(policies)}")
        if self.max_waiting < 1:
            raise ConfigError(f"{PREFIX}MAX_WAITING={self.max_waiting}: must be at least 1")
        if self.probe_interval <= 0:
            raise ConfigError(f"{PREFIX}PROBE_INTERVAL={self.probe_interval}: must be positive")

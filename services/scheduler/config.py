"""Scheduler service settings (prefix ``LLMFABRIC_SCHEDULER_``)."""

from __future__ import annotations

import dataclasses

from llmfabric.runtime.config import ConfigError, ServerSettings, setting
from llmfabric.runtime.upstream import config_target

from .router import RoutingPolicy

PREFIX = "LLMFABRIC_SCHEDULER_"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig(ServerSettings):
    """Settings of the scheduler."""

    workers: tuple[str, ...] = setting((), help="comma-separated worker host:port list, or consul:<service> to follow Consul")
    routing: str = setting("cache_aware", help="routing policy: cache_aware, least_load or round_robin")
    cache_threshold: float = setting(0.5, help="cache_aware: share of the prompt a worker's tree must match to win")
    balance_abs_threshold: int = setting(
        3, help="cache_aware: in-flight gap (max - min) that counts as imbalance (3: a 3-vs-0 split still follows the cache) ..."
    )
    balance_rel_threshold: float = setting(1.5, help="cache_aware: ... together with max > min x this ratio")
    tree_tokens: int = setting(65536, help="cache_aware: tokens remembered per worker when its KV size is unknown")
    reserved_slots: int = setting(
        1, help="slots per worker batch/background requests may not use (kept for interactive/critical; 0 = none)"
    )
    breaker_failures: int = setting(3, help="consecutive call failures that open a worker's circuit breaker")
    breaker_cooldown: float = setting(5.0, help="seconds a breaker stays open before one trial request")
    max_waiting: int = setting(256, help="requests allowed to wait per priority level before RESOURCE_EXHAUSTED")
    max_waiting_tokens: int = setting(1 << 20, help="prompt tokens allowed to wait per priority level")
    aging_rate: float = setting(
        0.1, help="priority levels a waiting request gains per second (0.1: a batch request waiting 10 s competes as interactive; 0 = none)"
    )
    tenant_weights: tuple[str, ...] = setting((), help="fair-share weights inside a level, tenant=weight,... (others weigh 1)")
    tenant_max_priority: tuple[str, ...] = setting(
        (), help="highest priority a tenant may use, tenant=critical|interactive|batch|background,... (* = every tenant)"
    )
    max_retries: int = setting(1, help="retries on another worker when one fails before the first token")
    probe_interval: float = setting(1.0, help="seconds between worker load/health probes")

    def validate(self) -> None:
        if not self.workers:
            raise ConfigError(f"{PREFIX}WORKERS is required: comma-separated worker host:port addresses or consul:<service>")
        config_target(PREFIX, "workers", ",".join(self.workers), self.consul)
        policies = [p.value for p in RoutingPolicy]
        if self.routing not in policies:
            raise ConfigError(f"{PREFIX}ROUTING={self.routing!r}: must be one of {', '.join(policies)}")
        if self.max_waiting < 1:
            raise ConfigError(f"{PREFIX}MAX_WAITING={self.max_waiting}: must be at least 1")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ConfigError(f"{PREFIX}CACHE_THRESHOLD={self.cache_threshold}: must be in [0, 1]")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1.0:
            raise ConfigError(f"{PREFIX}BALANCE_ABS_THRESHOLD must be >= 0 and {PREFIX}BALANCE_REL_THRESHOLD >= 1")
        if self.tree_tokens < 1 or self.breaker_failures < 1 or self.breaker_cooldown < 0:
            raise ConfigError(f"{PREFIX}TREE_TOKENS and {PREFIX}BREAKER_FAILURES must be >= 1, {PREFIX}BREAKER_COOLDOWN >= 0")
        if self.reserved_slots < 0:
            raise ConfigError(f"{PREFIX}RESERVED_SLOTS={self.reserved_slots}: must be >= 0")
        if self.max_waiting_tokens < 1:
            raise ConfigError(f"{PREFIX}MAX_WAITING_TOKENS={self.max_waiting_tokens}: must be at least 1")
        if self.aging_rate < 0:
            raise ConfigError(f"{PREFIX}AGING_RATE={self.aging_rate}: must be >= 0")
        self.weights()
        self.priority_caps()
        if self.probe_interval <= 0:
            raise ConfigError(f"{PREFIX}PROBE_INTERVAL={self.probe_interval}: must be positive")

    def weights(self) -> tuple[tuple[str, float], ...]:
        out = []
        for item in self.tenant_weights:
            tenant, sep, raw = item.rpartition("=")
            try:
                weight = float(raw)
            except ValueError:
                weight = -1.0
            if not sep or not tenant or not weight > 0 or weight == float("inf"):
                raise ConfigError(f"{PREFIX}TENANT_WEIGHTS: {item!r} is not tenant=positive-weight")
            out.append((tenant, weight))
        return tuple(out)

    def priority_caps(self) -> dict[str, int]:
        names = {"critical": 1, "interactive": 2, "batch": 3, "background": 4}
        out = {}
        for item in self.tenant_max_priority:
            tenant, sep, level = item.rpartition("=")
            if not sep or not tenant or level.lower() not in names:
                raise ConfigError(f"{PREFIX}TENANT_MAX_PRIORITY: {item!r} is not tenant=critical|interactive|batch|background")
            out[tenant] = names[level.lower()]
        return out

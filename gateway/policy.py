"""What the edge enforces, as frozen values checked when built.

:class:`EdgePolicy` is everything :func:`llmfabric.gateway.render.render_listener`
needs: listener address, timeouts, CORS, API keys, per-tenant rate limits,
request size limit and retries. Cluster addresses are not part of it: they
come from the control plane (ADS) or from the static bootstrap's arguments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from llmfabric.gateway.apikeys import ApiKey, validate_tenant

__all__ = ["EdgePolicy", "RateLimit", "RetryPolicy"]

_MIB = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: refilled at ``requests_per_second``, holding at most ``burst``.

    One request (a whole stream, however long) takes one token. Buckets live in
    each Envoy process: N edge replicas allow N times the rate.
    """

    # Sustained rate; fractions allowed (0.5 = one request every 2 s), 0.01..1e6.
    requests_per_second: float
    # Bucket size: requests allowed at once after a quiet spell (>= the rate).
    burst: int

    def __post_init__(self) -> None:
        rps = self.requests_per_second
        if (
            isinstance(rps, bool)
            or not isinstance(rps, int | float)
            or not math.isfinite(rps)
        ):
            raise ValueError(
                f"RateLimit.requests_per_second must be a number, got {rps!r}"
            )
        if not 0.01 <= rps <= 1_000_000:
            raise ValueError(
                f"RateLimit.requests_per_second must be 0.01..1000000, got {rps}"
            )
        if isinstance(self.burst, bool) or not isinstance(self.burst, int):
            raise ValueError(f"RateLimit.burst must be an int, got {self.burst!r}")  # noqa: TRY004
        if not max(1, rps) <= self.burst <= 10_000_000:
            raise ValueError(
                f"RateLimit.burst must be >= requests_per_second ({rps}), >= 1 and <= 10000000,"
                f" got {self.burst}"
            )

    def refill(self) -> tuple[int, int]:
        """(tokens per fill, fill interval in ms) giving this rate; interval 0.5 s..100 s."""
        tokens = max(1, math.floor(self.requests_per_second))
        return tokens, round(1000 * tokens / self.requests_per_second)


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of requests that never reached an upstream (see the listener template)."""

    # Retries after the first attempt; 0 renders no retry policy.
    num_retries: int = 2
    # First back-off; Envoy doubles it with jitter up to backoff_max_ms.
    backoff_base_ms: int = 25
    # Longest back-off between attempts.
    backoff_max_ms: int = 250
    # Retries in flight may be at most this share of active requests (cluster retry budget).
    budget_percent: float = 20.0
    # ... but this many concurrent retries are always allowed (1-2 hosts, few requests).
    min_retry_concurrency: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.num_retries <= 5:
            raise ValueError(
                f"RetryPolicy.num_retries must be 0..5, got {self.num_retries}"
            )
        if not 1 <= self.backoff_base_ms <= self.backoff_max_ms <= 10_000:
            raise ValueError(
                "RetryPolicy back-off must satisfy 1 <= backoff_base_ms <= backoff_max_ms <= 10000,"
                f" got {self.backoff_base_ms}/{self.backoff_max_ms}"
            )
        if not (math.isfinite(self.budget_percent) and 0 < self.budget_percent <= 100):
            raise ValueError(
                f"RetryPolicy.budget_percent must be in (0, 100], got {self.budget_percent}"
            )
        if self.min_retry_concurrency < 1:
            raise ValueError(
                f"RetryPolicy.min_retry_concurrency must be >= 1, got {self.min_retry_concurrency}"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class EdgePolicy:
    """Everything the edge listener enforces; rendered by ``render_listener``."""

    # FileDescriptorSet (built with --include_imports) for the JSON transcoder; a path
    # on the Envoy host.
    descriptor_path: str
    # Address the public listener binds (HTTP/1.1 and h2c on one port).
    listen_host: str = "127.0.0.1"
    # Port of the public listener.
    listen_port: int = 8080
    # File for the JSON access log; "" writes it to stdout.
    access_log_path: str = ""
    # A stream with no bytes in either direction for this long is reset; 0 disables.
    stream_idle_timeout_s: int = 300
    # Whole-request timeout on routes; 0 disables it (streams are long).
    request_timeout_s: int = 0
    # Origins allowed by CORS; "*" allows any origin, () none.
    cors_allow_origins: tuple[str, ...] = ("*",)
    # Accepted credentials (Authorization: Bearer <key> or x-api-key: <key>).
    api_keys: tuple[ApiKey, ...] = ()
    # False renders no authentication (dev, tests); client x-tenant-id is still dropped.
    auth_required: bool = True
    # Bucket of every tenant without an override, and of requests without a tenant;
    # None renders no rate limiting.
    rate_limit: RateLimit | None = RateLimit(requests_per_second=50, burst=100)
    # Per-tenant buckets replacing rate_limit for those tenants: ((tenant, limit), ...).
    tenant_rate_limits: tuple[tuple[str, RateLimit], ...] = ()
    # Largest request body accepted (413 / RESOURCE_EXHAUSTED above it).
    max_request_bytes: int = _MIB
    # Retries of requests that never reached an upstream.
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self) -> None:
        if not self.descriptor_path:
            raise ValueError("EdgePolicy.descriptor_path is required")
        if not self.listen_host:
            raise ValueError("EdgePolicy.listen_host is required")
        if not 0 <= self.listen_port <= 65535:
            raise ValueError(f"EdgePolicy.listen_port out of range: {self.listen_port}")
        if self.stream_idle_timeout_s < 0 or self.request_timeout_s < 0:
            raise ValueError("EdgePolicy timeouts must be >= 0")
        if any(not isinstance(o, str) or not o for o in self.cors_allow_origins):
            raise ValueError(
                "EdgePolicy.cors_allow_origins entries must be non-empty strings"
            )
        if any(not isinstance(k, ApiKey) for k in self.api_keys):
            raise ValueError("EdgePolicy.api_keys must hold ApiKey values")
        if len({k.key for k in self.api_keys}) != len(self.api_keys):
            raise ValueError("EdgePolicy.api_keys: a key appears more than once")
        if self.auth_required and not self.api_keys:
            raise ValueError(
                "EdgePolicy.auth_required needs at least one API key "
                "(set auth_required=False for an open edge)"
            )
        tenants = [t for t, _ in self.tenant_rate_limits]
        for tenant, limit in self.tenant_rate_limits:
            try:
                validate_tenant(tenant)
            except ValueError as err:
                raise ValueError(f"EdgePolicy.tenant_rate_limits: {err}") from None
            if not isinstance(limit, RateLimit):
                msg = f"EdgePolicy.tenant_rate_limits[{tenant!r}] must be a RateLimit"
                raise ValueError(msg)  # noqa: TRY004
        if len(set(tenants)) != len(tenants):
            raise ValueError(
                "EdgePolicy.tenant_rate_limits: a tenant appears more than once"
            )
        if self.tenant_rate_limits and self.rate_limit is None:
            raise ValueError("EdgePolicy.tenant_rate_limits needs a default rate_limit")
        if not 1024 <= self.max_request_bytes <= 1 << 30:
            raise ValueError(
                f"EdgePolicy.max_request_bytes must be 1 KiB..1 GiB, got {self.max_request_bytes}"
            )

    @property
    def tenants(self) -> tuple[str, ...]:
        """Every tenant known from the keys and the overrides, sorted."""
        return tuple(
            sorted(
                {k.tenant for k in self.api_keys}
                | {t for t, _ in self.tenant_rate_limits}
            )
        )

    def tenant_buckets(self) -> Iterator[tuple[str, RateLimit]]:
        """(tenant, bucket) for every known tenant; empty without rate limiting."""
        if self.rate_limit is None:
            return
        overrides = dict(self.tenant_rate_limits)
        for tenant in self.tenants:
            yield tenant, overrides.get(tenant, self.rate_limit)


def parse_tenant_limits(text: str, what: str) -> tuple[tuple[str, RateLimit], ...]:
    """``tenant=rps:burst,...`` -> per-tenant buckets."""
    out = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        tenant, sep, spec = entry.partition("=")
        rps, sep2, burst = spec.partition(":")
        try:
            out.append((tenant.strip(), RateLimit(float(rps), int(burst) if sep2 else max(1, int(float(rps) * 2)))))
        except ValueError as exc:
            raise ValueError(f"{what}: {entry!r} is not tenant=rps[:burst] ({exc})") from None
        if not sep:
            raise ValueError(f"{what}: {entry!r} is not tenant=rps[:burst]")
    return tuple(out)

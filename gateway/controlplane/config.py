"""Control plane settings (prefix ``LLMFABRIC_XDS_``): where the frontends
are, and the edge policy it renders into Envoy's listener."""

from __future__ import annotations

import dataclasses

from llmfabric.gateway.policy import EdgePolicy, RateLimit, parse_tenant_limits
from llmfabric.runtime.config import ConfigError, ServerSettings, setting
from llmfabric.runtime.upstream import config_target

PREFIX = "LLMFABRIC_XDS_"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class XdsConfig(ServerSettings):
    """Settings of the xDS control plane."""

    frontend: str = setting("consul:frontend", help="frontend gRPC: host:port[,...] or consul:<service> (HTTP port from its http_port meta)")
    frontend_http: str = setting("", help="frontend OpenAI HTTP host:port[,...] (static frontends only)")
    descriptor_path: str = setting("", help="FileDescriptorSet for REST transcoding, as Envoy sees the path ('' = build/llmfabric.pb)")
    listen_host: str = setting("0.0.0.0", help="address Envoy's public listener binds")
    listen_port: int = setting(8080, help="port of Envoy's public listener (gRPC, REST/SSE, OpenAI HTTP)")
    access_log_path: str = setting("", help="Envoy's JSON access log file ('' = Envoy's stdout)")
    api_keys: str = setting("", help="comma-separated key:tenant pairs (prefer API_KEYS_FILE: env values show in process listings)")
    api_keys_file: str = setting("", help="file of key:tenant lines (a mounted secret); re-read when it changes")
    auth: bool = setting(True, help="require an API key (false: every caller is anonymous; development only)")
    rate_limit_rps: float = setting(20.0, help="requests per second per tenant at the edge (0 = no limit)")
    rate_limit_burst: int = setting(40, help="requests a tenant may send at once above its rate")
    tenant_rate_limits: str = setting("", help="per-tenant overrides: tenant=rps[:burst],...")
    max_request_bytes: int = setting(1 << 20, help="largest request body the edge accepts (413 / RESOURCE_EXHAUSTED above)")
    cors_origins: tuple[str, ...] = setting(("*",), help="comma-separated origins allowed by CORS ('*' = any)")
    stream_idle_timeout_s: int = setting(300, help="a stream silent this long in both directions is reset")
    keys_poll_seconds: float = setting(2.0, help="how often the API key file is checked for changes")

    def validate(self) -> None:
        if not config_target(PREFIX, "frontend", self.frontend, self.consul).consul_service:
            config_target(PREFIX, "frontend_http", self.frontend_http, self.consul)
        if self.auth and not (self.api_keys or self.api_keys_file):
            raise ConfigError(f"{PREFIX}AUTH is on but no keys: set {PREFIX}API_KEYS_FILE (key:tenant lines) "
                              f"or {PREFIX}API_KEYS, or {PREFIX}AUTH=false for development")
        if self.rate_limit_rps < 0 or self.rate_limit_burst < 1:
            raise ConfigError(f"{PREFIX}RATE_LIMIT_RPS must be >= 0 and {PREFIX}RATE_LIMIT_BURST >= 1")
        try:
            parse_tenant_limits(self.tenant_rate_limits, f"{PREFIX}TENANT_RATE_LIMITS")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not 0 < self.listen_port < 65536:
            raise ConfigError(f"{PREFIX}LISTEN_PORT={self.listen_port}: not a port")
        self._check_policy()

    def _check_policy(self) -> None:
        """Everything the edge policy would reject, named by its variable (not a traceback at load)."""
        checks = [
            ("RATE_LIMIT_RPS", lambda: RateLimit(self.rate_limit_rps, self.rate_limit_burst) if self.rate_limit_rps else None),
            ("MAX_REQUEST_BYTES", lambda: EdgePolicy("x", max_request_bytes=self.max_request_bytes, auth_required=False)),
            ("STREAM_IDLE_TIMEOUT_S", lambda: EdgePolicy("x", stream_idle_timeout_s=self.stream_idle_timeout_s,
                                                          auth_required=False)),
            ("CORS_ORIGINS", lambda: EdgePolicy("x", cors_allow_origins=self.cors_origins, auth_required=False)),
            ("TENANT_RATE_LIMITS", lambda: EdgePolicy(
                "x", auth_required=False, rate_limit=RateLimit(1, 1),
                tenant_rate_limits=parse_tenant_limits(self.tenant_rate_limits, f"{PREFIX}TENANT_RATE_LIMITS"))),
        ]
        for name, build in checks:
            try:
                build()
            except ValueError as exc:
                raise ConfigError(f"{PREFIX}{name}: {exc}") from None

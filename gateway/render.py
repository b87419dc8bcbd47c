"""Envoy config pieces from the templates in ``envoy/``, as v3 JSON dicts.

Each piece is one xDS resource in Envoy's JSON form (``typed_config`` with
``"@type"``), ready for ``json_format.ParseDict`` (see :func:`to_proto`):

* :func:`render_listener` — the edge listener (LDS), routes and HTTP filters inline;
* :func:`render_cluster` — ``frontend_grpc`` / ``frontend_http`` (CDS), EDS over ADS
  or with fixed endpoints;
* :func:`render_load_assignment` — a cluster's endpoints (EDS).

Two bootstraps wrap them: :func:`render_ads_bootstrap` (everything over ADS
from the control plane) and :func:`render_static_bootstrap` (the same listener
and clusters inline, for ``envoy --mode validate`` and control-plane-free runs).
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import ipaddress
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import jinja2
import yaml
from google.protobuf import json_format, message
from llmfabric.gateway.policy import EdgePolicy, RateLimit, RetryPolicy

__all__ = [
    "GRPC_CLUSTER",
    "HTTP_CLUSTER",
    "XDS_CLUSTER",
    "render_ads_bootstrap",
    "render_cluster",
    "render_listener",
    "render_load_assignment",
    "render_static_bootstrap",
    "to_proto",
]

GRPC_CLUSTER = (
    "frontend_grpc"  # the frontend's gRPC port (native gRPC and transcoded REST)
)
HTTP_CLUSTER = "frontend_http"  # the frontend's OpenAI-compatible HTTP port
XDS_CLUSTER = "llmfabric_xds"  # the control plane, in the ADS bootstrap

_DEFAULT_RETRY = RetryPolicy()

Kind = Literal["listener", "cluster", "load_assignment", "bootstrap"]

# Message of each kind, and every module whose types appear as "@type" in a
# rendered piece: importing them registers the types so that ParseDict can
# resolve each google.protobuf.Any.
_KINDS = {
    "listener": ("envoy.config.listener.v3.listener_pb2", "Listener"),
    "cluster": ("envoy.config.cluster.v3.cluster_pb2", "Cluster"),
    "load_assignment": (
        "envoy.config.endpoint.v3.endpoint_pb2",
        "ClusterLoadAssignment",
    ),
    "bootstrap": ("envoy.config.bootstrap.v3.bootstrap_pb2", "Bootstrap"),
}
_ANY_MODULES = (
    "envoy.config.route.v3.route_components_pb2",
    "envoy.extensions.access_loggers.file.v3.file_pb2",
    "envoy.extensions.access_loggers.stream.v3.stream_pb2",
    "envoy.extensions.filters.http.api_key_auth.v3.api_key_auth_pb2",
    "envoy.extensions.filters.http.buffer.v3.buffer_pb2",
    "envoy.extensions.filters.http.cors.v3.cors_pb2",
    "envoy.extensions.filters.http.grpc_json_transcoder.v3.transcoder_pb2",
    "envoy.extensions.filters.http.header_mutation.v3.header_mutation_pb2",
    "envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.resource_monitors.downstream_connections.v3.downstream_connections_pb2",
    "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
)


def to_proto(kind: Kind, d: dict[str, Any]) -> message.Message:
    """``d`` parsed strictly (no unknown fields) into its Envoy message.

    Raises ``json_format.ParseError`` when a field, enum or ``@type`` is not
    what the v3 API defines.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    module, name = _KINDS[kind]
    for extra in _ANY_MODULES:
        importlib.import_module(extra)
    msg = getattr(importlib.import_module(module), name)()
    return json_format.ParseDict(d, msg, ignore_unknown_fields=False)


def _toyaml(value: Any) -> str:
    return yaml.safe_dump(
        value, sort_keys=False, default_flow_style=False, width=1 << 16
    ).rstrip()


@functools.cache
def _env() -> jinja2.Environment:
    root = importlib.resources.files("llmfabric.gateway").joinpath("envoy")

    def load(name: str) -> str:
        return root.joinpath(name).read_text(encoding="utf-8")

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(load),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["toyaml"] = _toyaml
    return env


def _render(template: str, **context: Any) -> str:
    return _env().get_template(template).render(**context)


# libyaml's parser when present: the pure-Python one made a snapshot ~5x slower (46 vs 9 ms).
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(template: str, **context: Any) -> dict[str, Any]:
    return yaml.load(_render(template, **context), Loader=_YamlLoader)  # noqa: S506 - a safe loader


def _bucket(limit: RateLimit) -> dict[str, Any]:
    """An Envoy TokenBucket for ``limit``."""
    tokens, interval_ms = limit.refill()
    return {
        "max_tokens": limit.burst,
        "tokens_per_fill": tokens,
        "fill_interval": f"{interval_ms // 1000}.{interval_ms % 1000:03d}s",
    }


def _retry_after(limits: Sequence[RateLimit]) -> int:
    """Seconds in 429s' Retry-After: the slowest bucket's refill interval, 1..60.

    The filter adds one value whichever bucket ran dry, so it is the longest
    wait any tenant needs for its next token (a client retrying sooner would
    just be limited again).
    """
    longest_ms = max((lb.refill()[1] for lb in limits), default=1000)
    return min(60, max(1, math.ceil(longest_ms / 1000)))


def _discovery_type(hosts: Sequence[str]) -> str:
    """STATIC when every host is an IP literal, STRICT_DNS otherwise (a compose name)."""
    try:
        for host in hosts:
            ipaddress.ip_address(host)
    except ValueError:
        return "STRICT_DNS"
    return "STATIC"


def _check_endpoint(host: str, port: int, what: str) -> None:
    if not host or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(
            f"{what}: endpoint ({host!r}, {port!r}) needs a host and a port 1..65535"
        )


def render_listener(policy: EdgePolicy) -> dict[str, Any]:
    """The edge listener (routes and HTTP filters inline) for ``policy``."""
    # Tenant buckets only with auth: without it no request carries a tenant.
    buckets = list(policy.tenant_buckets()) if policy.auth_required else []
    limits = (
        [lb for _, lb in buckets] + [policy.rate_limit] if policy.rate_limit else []
    )
    return _load(
        "listener.yaml.j2",
        p=policy,
        descriptor_path=os.path.abspath(policy.descriptor_path),
        allow_any_origin="*" in policy.cors_allow_origins,
        auth=policy.auth_required,
        rate_limited=policy.rate_limit is not None,
        buckets=buckets,
        bucket=_bucket,
        retry_after=_retry_after(limits),
    )


def render_load_assignment(
    cluster_name: str, endpoints: Sequence[tuple[str, int]]
) -> dict[str, Any]:
    """The endpoints of ``cluster_name`` (one locality, equal weights)."""
    if not cluster_name:
        raise ValueError("render_load_assignment: cluster_name is required")
    for host, port in endpoints:
        _check_endpoint(host, port, cluster_name)
    return _load(
        "load_assignment.yaml.j2", cluster_name=cluster_name, endpoints=list(endpoints)
    )


def render_cluster(
    name: str,
    kind: Literal["grpc", "http"],
    *,
    ads: bool,
    endpoints: Sequence[tuple[str, int]] = (),
    retry: RetryPolicy = _DEFAULT_RETRY,
) -> dict[str, Any]:
    """An upstream cluster: HTTP/2 for ``kind="grpc"``, HTTP/1.1 for ``"http"``.

    ``ads=True``: endpoints come over EDS on the ADS stream (``endpoints`` must
    be empty). ``ads=False``: ``endpoints`` are inline (STATIC for IPs,
    STRICT_DNS for names). ``retry`` sizes the cluster's retry budget.
    """
    if not name:
        raise ValueError("render_cluster: name is required")
    if kind not in ("grpc", "http"):
        raise ValueError(f"render_cluster: kind must be 'grpc' or 'http', got {kind!r}")
    if ads and endpoints:
        raise ValueError(
            f"render_cluster({name!r}): endpoints come over EDS when ads=True"
        )
    if not ads and not endpoints:
        raise ValueError(f"render_cluster({name!r}): a static cluster needs endpoints")
    return _load(
        "cluster.yaml.j2",
        name=name,
        kind=kind,
        ads=ads,
        retry=retry,
        discovery=_discovery_type([h for h, _ in endpoints]),
        load_assignment=None if ads else render_load_assignment(name, endpoints),
    )


def _check_admin(admin_host: str, admin_port: int) -> None:
    if not admin_host or not 0 <= admin_port <= 65535:
        raise ValueError(
            f"admin address ({admin_host!r}, {admin_port!r}) is not host + port 0..65535"
        )


def render_static_bootstrap(
    policy: EdgePolicy,
    frontend_grpc: tuple[str, int],
    frontend_http: tuple[str, int],
    admin_host: str,
    admin_port: int,
) -> str:
    """Bootstrap YAML with the edge listener and both clusters inline (no xDS)."""
    _check_admin(admin_host, admin_port)
    clusters = [
        render_cluster(
            GRPC_CLUSTER,
            "grpc",
            ads=False,
            endpoints=[frontend_grpc],
            retry=policy.retry,
        ),
        render_cluster(
            HTTP_CLUSTER,
            "http",
            ads=False,
            endpoints=[frontend_http],
            retry=policy.retry,
        ),
    ]
    return _render(
        "bootstrap_static.yaml.j2",
        listener=render_listener(policy),
        clusters=clusters,
        admin_host=admin_host,
        admin_port=admin_port,
    )


def render_ads_bootstrap(
    node_id: str, admin_host: str, admin_port: int, xds_host: str, xds_port: int,
    *, ops_port: int = 0, ops_host: str = "0.0.0.0",
) -> str:
    """Bootstrap YAML whose listeners, clusters and endpoints all come over ADS.

    ``ops_port`` adds a static listener on ``ops_host:ops_port`` that serves
    only the admin interface's ``/ready`` and ``/stats/prometheus`` (for
    probes and Prometheus in containers), so the admin interface itself, whose
    /config_dump shows API keys, stays on loopback."""
    if not node_id:
        raise ValueError("render_ads_bootstrap: node_id is required")
    _check_admin(admin_host, admin_port)
    _check_endpoint(xds_host, xds_port, XDS_CLUSTER)
    if ops_port:
        if not 0 < ops_port < 65536 or ops_port == admin_port:
            raise ValueError(f"ops_port {ops_port!r}: a port 1..65535 other than the admin port")
        if admin_port == 0:
            raise ValueError("ops_port needs a fixed admin_port (it forwards to the admin interface)")
    return _render(
        "bootstrap_ads.yaml.j2",
        node_id=node_id,
        admin_host=admin_host,
        admin_port=admin_port,
        xds_host=xds_host,
        xds_port=xds_port,
        xds_discovery=_discovery_type([xds_host]),
        ops_host=ops_host,
        ops_port=ops_port,
        admin_upstream="127.0.0.1" if admin_host in ("0.0.0.0", "::") else admin_host,
    )

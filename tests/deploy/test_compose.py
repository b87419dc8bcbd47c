"""docker-compose.yml, checked offline: `docker-compose config -q` for every
profile (docker-compose 1.29.2 from PyPI, in .venv-deploy), the resolved
services held to the image's service table and settings (no drift), secure
defaults, and `envoy --mode validate` on the Envoy configs it mounts."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import yaml

from deploy_checks import (
    ROOT,
    check_settings,
    expected_bootstrap,
    regenerate_hint,
    run,
    seconds,
    validate_edge_listener,
    validate_envoy_text,
)
from llmfabric.cli.container import NAMES, SERVICES, EDGE_PORT

COMPOSE = ROOT / ".venv-deploy" / "bin" / "docker-compose"
PROFILES = {"default": [], "gpu": ["--profile", "gpu"]}


def compose(*args: str, password: str | None = "ci-only") -> tuple[int, str]:
    assert COMPOSE.exists(), "docker-compose is missing: run `make deploy-tools`"
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    if password is not None:
        env["GRAFANA_ADMIN_PASSWORD"] = password
    res = run([str(COMPOSE), "-f", "docker-compose.yml", "--env-file", ".env.example", *args], env=env)
    return res.returncode, res.stdout + res.stderr


@pytest.fixture(scope="module", params=sorted(PROFILES))
def resolved(request) -> dict:
    code, out = compose(*PROFILES[request.param], "config")
    assert code == 0, out
    spec = yaml.safe_load(out)
    active = {n: s for n, s in spec["services"].items()
              if request.param == "gpu" or not s.get("profiles")}
    spec["services"] = active
    return spec


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_config_is_valid(profile: str) -> None:
    code, out = compose(*PROFILES[profile], "config", "-q")
    assert code == 0, out


def test_no_shared_default_password() -> None:
    code, out = compose("config", "-q", password=None)
    assert code != 0 and "GRAFANA_ADMIN_PASSWORD" in out


def test_env_example_documents_every_variable_the_file_uses() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    import re

    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    documented = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#") and "=" in line}
    assert used <= documented, sorted(used - documented)
    for line in (ROOT / ".env.example").read_text().splitlines():  # no secret values in it
        if not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            if any(w in name for w in ("PASSWORD", "TOKEN", "SECRET")):
                assert value == "", f"{name} has a value in .env.example"


def ours(spec: dict) -> dict[str, dict]:
    return {n: s for n, s in spec["services"].items() if s.get("build")}


def mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of a service's volumes, long or short ("src:dst:mode") syntax."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out.append((v.get("source", ""), v["target"], bool(v.get("read_only"))))
        else:
            src, dst, *mode = str(v).split(":")
            out.append((src, dst, mode == ["ro"]))
    return out


def command_of(svc: dict) -> str:
    cmd = svc["command"]
    return cmd[0] if isinstance(cmd, list) else cmd


def test_every_llmfabric_service_runs_the_image_with_its_settings(resolved: dict) -> None:
    services = ours(resolved)
    assert {command_of(s) for s in services.values()} >= {*SERVICES, "envoy"}
    images = {s["image"] for s in services.values()}
    assert len(images) == 1, images
    for name, svc in services.items():
        command = command_of(svc)
        assert command in NAMES, name
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        check_settings(command, env, f"docker-compose.yml service {name}")
        assert svc["healthcheck"]["test"] == ["CMD", "llmfabric", "probe", command], name
        if command in SERVICES:
            consul = env.get(SERVICES[command].prefix + "CONSUL", "")
            assert consul == "http://consul:8500", f"{name} does not register in Consul"
        if command == "xds":
            validate_edge_listener(env, f"docker-compose.yml service {name}")


def test_containers_are_locked_down(resolved: dict) -> None:
    for name, svc in resolved["services"].items():
        assert svc.get("restart") == "unless-stopped", name
        assert "ALL" in svc.get("cap_drop", []), name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("deploy", {}).get("resources", {}).get("limits"), f"{name} has no resource limits"
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
            assert resolved["services"][dep].get("healthcheck"), (name, dep)
    for name, svc in ours(resolved).items():
        assert svc["user"] == "10001:10001" and svc["read_only"] is True, name
        env = svc.get("environment") or {}
        drain = max([float(v) for k, v in env.items() if k.endswith("_DRAIN_SECONDS")] or [20.0])
        assert seconds(svc["stop_grace_period"]) > drain, f"{name}: stop_grace_period <= drain"


def test_only_the_edge_is_published_to_the_network(resolved: dict) -> None:
    for name, svc in resolved["services"].items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                host_ip, target = port.get("host_ip", ""), int(port["target"])
            else:  # docker-compose 1.29 prints "[host_ip:]published:target/proto"
                parts = str(port).split("/")[0].split(":")
                host_ip, target = (parts[0] if len(parts) == 3 else ""), int(parts[-1])
            if target == EDGE_PORT and svc.get("build") and command_of(svc) == "envoy":
                continue
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond the host's loopback"


def test_volumes_and_secrets(resolved: dict) -> None:
    assert {"semcache-data", "consul-data"} <= set(resolved["volumes"])
    assert ("semcache-data", "/var/lib/llmfabric/semcache", False) in mounts(resolved["services"]["semcache"])
    assert ("consul-data", "/consul/data", False) in mounts(resolved["services"]["consul"])
    xds = next(s for s in resolved["services"].values() if s.get("build") and command_of(s) == "xds")
    assert xds["environment"]["LLMFABRIC_XDS_API_KEYS_FILE"] == f"/run/secrets/{xds['secrets'][0]['source']}"
    assert "LLMFABRIC_XDS_API_KEYS" not in xds["environment"], "keys belong in the secret file"
    text = (ROOT / "docker-compose.yml").read_text()
    assert "lf-" not in text.replace("lf-$(openssl", ""), "an API key in the compose file"


def test_envoy_bootstrap_it_mounts_is_the_rendered_one_and_valid(resolved: dict) -> None:
    envoy = next(s for s in resolved["services"].values() if s.get("build") and command_of(s) == "envoy")
    (mount,) = [m for m in mounts(envoy) if m[1] == envoy["environment"]["LLMFABRIC_ENVOY_BOOTSTRAP"]]
    assert mount[2], "the bootstrap is mounted read-only"
    path = pathlib.Path(mount[0])
    assert path.read_text() == expected_bootstrap(), regenerate_hint(str(path.relative_to(ROOT)))
    validate_envoy_text(path.read_text(), "bootstrap.yaml")


def test_gpu_profile_engines(resolved: dict) -> None:
    engines = {s["environment"].get("LLMFABRIC_WORKER_ENGINE") for s in ours(resolved).values()
               if command_of(s) == "worker"}
    if "sglang" not in engines:
        assert engines == {"embedded"}
        return
    assert engines == {"embedded", "sglang", "triton"}
    for name in ("sglang", "triton"):
        devices = resolved["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"], name
    triton = resolved["services"]["triton"]
    assert triton["environment"]["TRITON_MODEL"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "--model-repository=/tmp/models" in triton["command"][-1]
    repo = ROOT / "deploy" / "triton" / "model_repository" / "llmfabric_llm"
    assert 'backend: "vllm"' in (repo / "config.pbtxt").read_text()
    assert json.loads((repo / "1" / "model.json").read_text())["model"]

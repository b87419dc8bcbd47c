"""What docker-compose.yml and k8s/ are both held to: the service table in
services/cli/container.py, the settings classes, the Envoy bootstrap the
image expects, and Envoy's own validation of the configs they produce."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import tempfile

from llmfabric.cli.container import (
    COMMON_VARIABLES,
    ENVOY_ADMIN_PORT,
    ENVOY_OPS_PORT,
    NAMES,
    SERVICES,
    XDS_PORT,
)
from llmfabric.cli.edge_process import PREFIX as ENVOY_PREFIX
from llmfabric.cli.edge_process import EnvoySettings
from llmfabric.gateway.controlplane.config import XdsConfig
from llmfabric.gateway.controlplane.server import ControlPlane
from llmfabric.gateway.edge import validate_config
from llmfabric.gateway.render import render_ads_bootstrap, render_static_bootstrap
from llmfabric.runtime.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENVOY_VARIABLES = {ENVOY_PREFIX + name.upper() for name in EnvoySettings.__dataclass_fields__}


def expected_bootstrap() -> str:
    """The Envoy bootstrap every deployment mounts (xds by its service name)."""
    return render_ads_bootstrap("llmfabric-edge", "127.0.0.1", ENVOY_ADMIN_PORT, "xds", XDS_PORT, ops_port=ENVOY_OPS_PORT)


def regenerate_hint(path: str) -> str:
    return (f"{path} differs from render_ads_bootstrap(); regenerate it: PYTHONPATH=tests/deploy .venv/bin/python -c "
            f"\"from deploy_checks import expected_bootstrap; print(expected_bootstrap(), end='')\" > {path}")


def known_variables(command: str) -> set[str]:
    if command == "envoy":
        return ENVOY_VARIABLES | COMMON_VARIABLES
    return SERVICES[command].variables() | COMMON_VARIABLES


def check_settings(command: str, env: dict[str, str], where: str) -> object:
    """Every LLMFABRIC_* variable ``env`` sets is a setting of ``command``, and
    together with the image's defaults they load (what `llmfabric serve` would)."""
    assert command in NAMES, f"{where}: {command!r} is not a service of the image ({', '.join(NAMES)})"
    ours = {k: v for k, v in env.items() if k.startswith("LLMFABRIC_")}
    unknown = set(ours) - known_variables(command)
    assert not unknown, f"{where}: {sorted(unknown)} are not settings of {command}"
    if command == "envoy":
        return load_config(EnvoySettings, ENVOY_PREFIX, [], ours)
    svc = SERVICES[command]
    merged = {**svc.environment(), **ours}
    return load_config(svc.config_class(), svc.prefix, [], merged)


def validate_envoy_text(text: str, name: str) -> None:
    """``envoy --mode validate`` on a config given as text."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / name
        path.write_text(text)
        validate_config(str(path))


def validate_edge_listener(xds_env: dict[str, str], where: str) -> None:
    """The listener the control plane renders from these settings passes ``envoy --mode validate``."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = pathlib.Path(tmp) / "api-keys"
        keys.write_text("lf-deploycheckdeploycheckdeploycheck:t1\n")
        env = {**SERVICES["xds"].environment(), **{k: v for k, v in xds_env.items() if k.startswith("LLMFABRIC_")},
               "LLMFABRIC_XDS_DESCRIPTOR_PATH": str(ROOT / "build" / "llmfabric.pb")}
        if env.get("LLMFABRIC_XDS_API_KEYS_FILE"):
            env["LLMFABRIC_XDS_API_KEYS_FILE"] = str(keys)
        cfg = load_config(XdsConfig, "LLMFABRIC_XDS_", [], env)
        plane = ControlPlane(cfg)
        plane.keys = plane._read_keys()  # what its load() does
        policy = plane.policy()
        assert policy.listen_port == 8080, where
        text = render_static_bootstrap(policy, ("10.0.0.1", SERVICES["frontend"].grpc_port),
                                       ("10.0.0.1", SERVICES["frontend"].http_port), "127.0.0.1", ENVOY_ADMIN_PORT)
        validate_envoy_text(text, "edge.yaml")


def seconds(value: str | int | float) -> float:
    """Compose durations ("30s", "1m30s") and plain numbers."""
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    for amount, unit in re.findall(r"([\d.]+)(ms|s|m|h)", value):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: {hint}"
    return path


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)

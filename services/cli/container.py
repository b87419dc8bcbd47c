"""The services as the container image runs them: one table of what each
container serves (module, settings prefix, ports) used by ``llmfabric serve
<service>`` (the image's entrypoint), by ``llmfabric probe <service>`` (compose
health checks), and by the no-drift tests that hold docker-compose.yml and
k8s/ to it.

Inside a container every service binds 0.0.0.0 on the same well-known ports
(each container has its own address); an explicit ``LLMFABRIC_*`` variable
always wins over these defaults."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
import sys
import urllib.request

# The image's layout (Dockerfile): baked models, the proto descriptor, data volumes.
IMAGE_CACHE_DIR = "/opt/llmfabric/cache"  # LLMFABRIC_CACHE_DIR: q8_0 weights, MiniLM ONNX (read-only)
IMAGE_DESCRIPTOR = "/opt/llmfabric/llmfabric.pb"  # FileDescriptorSet for Envoy's transcoder
SEMCACHE_DATA_DIR = "/var/lib/llmfabric/semcache"  # volume: the semantic cache's snapshot
ENVOY_BOOTSTRAP = "/etc/llmfabric/envoy/bootstrap.yaml"  # mounted (compose file / ConfigMap)

GRPC_PORT = 50051
METRICS_PORT = 9464
FRONTEND_HTTP_PORT = 8000
XDS_PORT = 18000
EDGE_PORT = 8080  # Envoy's public listener (from the control plane's LLMFABRIC_XDS_LISTEN_PORT)
ENVOY_ADMIN_PORT = 9901  # loopback only: /config_dump shows API keys
ENVOY_OPS_PORT = 9902  # /ready and /stats/prometheus only, for probes and Prometheus


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerService:
    """One service of the image: ``llmfabric serve <name>``."""

    name: str  # compose service / k8s component / Consul name
    module: str  # what ``python -m`` runs
    prefix: str  # its settings' environment prefix
    config: str  # "module:Class" of its settings (every LLMFABRIC_* variable it reads)
    grpc_port: int = GRPC_PORT
    metrics_port: int = METRICS_PORT
    http_port: int = 0  # the frontend's OpenAI HTTP port
    defaults: tuple[tuple[str, str], ...] = ()  # extra FIELD=value defaults inside the image

    def environment(self) -> dict[str, str]:
        """The defaults ``serve`` sets (only where the environment has none)."""
        env = {"HOST": "0.0.0.0", "PORT": str(self.grpc_port), "METRICS_PORT": str(self.metrics_port)}
        if self.http_port:
            env["HTTP_PORT"] = str(self.http_port)
        env.update(self.defaults)
        return {self.prefix + k: v for k, v in env.items()}

    def config_class(self) -> type:
        module, _, cls = self.config.partition(":")
        return getattr(importlib.import_module(module), cls)

    def variables(self) -> set[str]:
        """Every environment variable this service's settings read."""
        return {self.prefix + f.name.upper() for f in dataclasses.fields(self.config_class())}


SERVICES: dict[str, ContainerService] = {s.name: s for s in (
    ContainerService("tokenizer", "llmfabric.tokenizer", "LLMFABRIC_TOKENIZER_", "llmfabric.tokenizer.config:TokenizerConfig"),
    ContainerService("semcache", "llmfabric.semcache", "LLMFABRIC_SEMCACHE_", "llmfabric.semcache.config:SemcacheConfig",
                     defaults=(("SNAPSHOT_PATH", f"{SEMCACHE_DATA_DIR}/snapshot.bin"),)),
    ContainerService("worker", "llmfabric.worker", "LLMFABRIC_WORKER_", "llmfabric.worker.config:WorkerConfig"),
    ContainerService("scheduler", "llmfabric.scheduler", "LLMFABRIC_SCHEDULER_", "llmfabric.scheduler.config:SchedulerConfig"),
    ContainerService("frontend", "llmfabric.frontend", "LLMFABRIC_FRONTEND_", "llmfabric.frontend.config:FrontendConfig",
                     http_port=FRONTEND_HTTP_PORT),
    ContainerService("xds", "llmfabric.gateway.controlplane", "LLMFABRIC_XDS_", "llmfabric.gateway.controlplane.config:XdsConfig",
                     grpc_port=XDS_PORT, defaults=(("DESCRIPTOR_PATH", IMAGE_DESCRIPTOR), ("LISTEN_PORT", str(EDGE_PORT)))),
)}
# Variables read outside a settings class (runtime.config.cache_dir, models.catalog).
COMMON_VARIABLES = {"LLMFABRIC_CACHE_DIR", "LLMFABRIC_MODEL_NAME", "LLMFABRIC_MODEL_PATH"}
NAMES = (*SERVICES, "envoy")


def serve(name: str, argv: list[str]) -> int:
    """Replace this process with service ``name`` (PID 1 in its container gets the signals)."""
    if name == "envoy":
        from .edge_process import run_envoy

        return run_envoy(argv)
    svc = SERVICES[name]
    env = dict(os.environ)
    for key, value in svc.environment().items():
        env.setdefault(key, value)
    os.execvpe(sys.executable, [sys.executable, "-m", svc.module, *argv], env)
    return 0  # not reached


def probe(name: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Is the local service ``name`` ready? (SERVING, or Envoy's /ready)."""
    if name == "envoy":
        url = f"http://127.0.0.1:{ENVOY_OPS_PORT}/ready"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
                return resp.status == 200, f"{url}: {resp.status}"
        except OSError as exc:
            return False, f"{url}: {exc}"
    from llmfabric.runtime.health import check

    svc = SERVICES[name]
    port = os.environ.get(svc.prefix + "PORT") or str(svc.grpc_port)
    status = asyncio.run(check(f"127.0.0.1:{port}", timeout=timeout))
    return status == "SERVING", f"{name} 127.0.0.1:{port}: {status}"

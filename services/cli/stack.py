"""The local stack: tokenizer, semantic cache, N workers, scheduler,
frontend(s), the xDS control plane and the Envoy edge as processes on
loopback (with ``engine="triton"`` also one Triton per worker, ``python -m
llmfabric.tritonserve``, each worker's engine pointing at its own). Envoy
always gets its listener, clusters and endpoints from the control plane
(ADS); with ``discovery="static"`` the control plane and the services use
the planned addresses, with ``discovery="consul"`` every service registers
in Consul and every consumer follows it. Used by ``llmfabric up`` and by the
integration tests (so both run exactly the same thing)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import random
import shutil
import sys
import time
import urllib.request

from llmfabric.gateway.edge import envoy_command, validate_config
from llmfabric.gateway.render import render_ads_bootstrap
from llmfabric.runtime.health import check

from .processes import Child, free_port, stop_all

ROOT = pathlib.Path(__file__).resolve().parents[2]
DESCRIPTOR = ROOT / "build" / "llmfabric.pb"
TRITON_MODEL = "llmfabric_llm"
# Service kind -> the name it registers under in Consul (runtime.startup: the service's own name).
CONSUL_NAMES = {"tokenizer": "tokenizer", "semcache": "semcache", "worker": "worker", "scheduler": "scheduler",
                "frontend": "frontend", "controlplane": "xds"}  # the decoupled model each tritonserve serves (vLLM backend tensor names)


@dataclasses.dataclass(frozen=True, slots=True)
class StackOptions:
    """What ``llmfabric up`` runs."""

    workers: int = 1  # inference workers
    engine: str = "embedded"  # worker engine: "embedded" (llama.cpp in the worker) or "triton" (a Triton each)
    routing: str = "cache_aware"  # scheduler routing policy
    host: str = "127.0.0.1"  # every listener binds here
    edge_port: int = 8080  # Envoy: gRPC, REST/SSE and OpenAI HTTP
    admin_port: int = 9901  # Envoy admin
    context_length: int = 2048  # per request (tokenizer and workers)
    capacity: int = 4  # sequences per worker batch
    state_dir: pathlib.Path = pathlib.Path(".llmfabric")  # logs, envoy.yaml, stack.json
    log_level: str = "info"  # services' log level
    drain_seconds: float = 10.0  # graceful stop budget per service
    semcache: bool = True  # run the semantic answer cache (snapshot in state_dir/semcache.bin)
    frontends: int = 1  # frontend processes behind the edge
    discovery: str = "static"  # "static" (planned addresses) or "consul"
    consul_url: str = ""  # discovery="consul": this agent ('' = start `consul agent -dev` from PATH)
    api_keys_file: pathlib.Path | None = None  # key:tenant lines for the edge (re-read when it changes)
    api_keys: str = ""  # or key:tenant pairs, comma-separated; neither = no authentication
    rate_limit_rps: float = 0.0  # edge requests per second per tenant (0 = unlimited; `llmfabric up` sets 20)
    rate_limit_burst: int = 40  # requests a tenant may send at once
    tenant_rate_limits: str = ""  # per-tenant overrides: tenant=rps[:burst],...


@dataclasses.dataclass(slots=True)
class Service:
    """One planned service: its process and where it listens."""

    name: str  # tokenizer, triton-0, worker-0, scheduler, frontend, edge
    kind: str  # module/role
    grpc: str  # host:port of its gRPC server (grpc.health.v1 there, except Triton's: HTTP /v2/health/ready)
    metrics: str = ""  # host:port of /metrics
    http: str = ""  # extra HTTP listener (frontend OpenAI API, Envoy admin)
    child: Child | None = None  # the process


class Stack:
    """Plans ports, starts every process in dependency order, waits for
    SERVING, records endpoints in ``state_dir/stack.json``, stops cleanly."""

    def __init__(self, opts: StackOptions) -> None:
        self.opts = opts
        self.services: list[Service] = []
        self.state_dir = opts.state_dir.resolve()
        self.consul_url = ""  # the agent services register with ('' = static discovery)

    # ------------------------------------------------------------ planning
    def _svc(self, name: str, module: str, args: list[str], env_prefix: str, extra_env: dict[str, str]) -> Service:
        h = self.opts.host
        port, mport = free_port(h), free_port(h)
        env = {
            f"{env_prefix}HOST": h, f"{env_prefix}PORT": str(port), f"{env_prefix}METRICS_PORT": str(mport),
            f"{env_prefix}LOG_LEVEL": self.opts.log_level, f"{env_prefix}DRAIN_SECONDS": str(self.opts.drain_seconds),
            **({f"{env_prefix}CONSUL": self.consul_url} if self.consul_url else {}),
            **extra_env,
        }
        argv = [sys.executable, "-m", f"llmfabric.{module}", *args]
        svc = Service(name, module.rsplit(".", 1)[-1], f"{h}:{port}", metrics=f"{h}:{mport}")
        svc.child = Child(name, argv, self.state_dir / "logs" / f"{name}.log", env=env)
        return svc

    def _target(self, consul_service: str, services: list[Service]) -> str:
        """How a consumer finds ``services``: Consul, or their planned addresses."""
        return f"consul:{consul_service}" if self.consul_url else ",".join(s.grpc for s in services)

    def _triton(self, name: str) -> Service:
        """A ``python -m llmfabric.tritonserve`` (Triton through PyTriton, the embedded engine inside)."""
        o, p = self.opts, "LLMFABRIC_TRITONSERVE_"
        grpc_port, http_port, metrics_port = free_port(o.host), free_port(o.host), free_port(o.host)
        env = {
            f"{p}HOST": o.host, f"{p}GRPC_PORT": str(grpc_port), f"{p}HTTP_PORT": str(http_port),
            f"{p}METRICS_PORT": str(metrics_port), f"{p}MODEL_NAME": TRITON_MODEL,
            f"{p}CONTEXT_LENGTH": str(o.context_length), f"{p}CAPACITY": str(o.capacity),
            f"{p}LOG_LEVEL": o.log_level, f"{p}DRAIN_SECONDS": str(o.drain_seconds),
        }
        svc = Service(name, "tritonserve", f"{o.host}:{grpc_port}", metrics=f"{o.host}:{metrics_port}",
                      http=f"{o.host}:{http_port}")
        argv = [sys.executable, "-m", "llmfabric.tritonserve"]
        svc.child = Child(name, argv, self.state_dir / "logs" / f"{name}.log", env=env)
        return svc

    def plan(self) -> None:
        o = self.opts
        if o.engine not in ("embedded", "triton"):
            raise ValueError(f"engine {o.engine!r}: must be embedded or triton")
        if o.discovery not in ("static", "consul"):
            raise ValueError(f"discovery {o.discovery!r}: must be static or consul")
        if o.frontends < 1:
            raise ValueError("frontends must be >= 1")
        consul = self._consul_agent() if o.discovery == "consul" and not o.consul_url else []
        self.consul_url = o.consul_url if o.discovery == "consul" and o.consul_url else (
            f"http://{consul[0].http}" if consul else "")
        ctx = str(o.context_length)
        tok = self._svc("tokenizer", "tokenizer", [], "LLMFABRIC_TOKENIZER_", {"LLMFABRIC_TOKENIZER_CONTEXT_LENGTH": ctx})
        tritons = [self._triton(f"triton-{i}") for i in range(o.workers)] if o.engine == "triton" else []
        workers = [
            self._svc(f"worker-{i}", "worker", [], "LLMFABRIC_WORKER_", {
                "LLMFABRIC_WORKER_WORKER_ID": f"worker-{i}", "LLMFABRIC_WORKER_CONTEXT_LENGTH": ctx,
                "LLMFABRIC_WORKER_CAPACITY": str(o.capacity), "LLMFABRIC_WORKER_ENGINE": o.engine,
                **({"LLMFABRIC_WORKER_TRITON_URL": tritons[i].grpc, "LLMFABRIC_WORKER_TRITON_MODEL": TRITON_MODEL}
                   if tritons else {}),
            })
            for i in range(o.workers)
        ]
        sched = self._svc("scheduler", "scheduler", [], "LLMFABRIC_SCHEDULER_", {
            "LLMFABRIC_SCHEDULER_WORKERS": self._target("worker", workers),
            "LLMFABRIC_SCHEDULER_ROUTING": o.routing,
        })
        cache = [self._svc("semcache", "semcache", [], "LLMFABRIC_SEMCACHE_", {
            "LLMFABRIC_SEMCACHE_SNAPSHOT_PATH": str(self.state_dir / "semcache.bin"),
        })] if o.semcache else []
        fronts = []
        for i in range(o.frontends):
            http_port = free_port(o.host)
            front = self._svc("frontend" if o.frontends == 1 else f"frontend-{i}", "frontend", [], "LLMFABRIC_FRONTEND_", {
                "LLMFABRIC_FRONTEND_TOKENIZER": self._target("tokenizer", [tok]),
                "LLMFABRIC_FRONTEND_SCHEDULER": self._target("scheduler", [sched]),
                "LLMFABRIC_FRONTEND_HTTP_PORT": str(http_port),
                "LLMFABRIC_FRONTEND_SEMCACHE": self._target("semcache", cache) if cache else "",
            })
            front.http = f"{o.host}:{http_port}"
            fronts.append(front)
        xds = self._svc("xds", "gateway.controlplane", [], "LLMFABRIC_XDS_", {
            "LLMFABRIC_XDS_FRONTEND": self._target("frontend", fronts),
            "LLMFABRIC_XDS_FRONTEND_HTTP": ",".join(f.http for f in fronts),
            "LLMFABRIC_XDS_DESCRIPTOR_PATH": str(DESCRIPTOR),
            "LLMFABRIC_XDS_LISTEN_HOST": o.host, "LLMFABRIC_XDS_LISTEN_PORT": str(o.edge_port),
            "LLMFABRIC_XDS_ACCESS_LOG_PATH": str(self.state_dir / "logs" / "access.log"),
            "LLMFABRIC_XDS_AUTH": "true" if o.api_keys_file or o.api_keys else "false",
            "LLMFABRIC_XDS_API_KEYS_FILE": str(o.api_keys_file or ""),
            "LLMFABRIC_XDS_API_KEYS": o.api_keys,
            "LLMFABRIC_XDS_RATE_LIMIT_RPS": str(o.rate_limit_rps),
            "LLMFABRIC_XDS_RATE_LIMIT_BURST": str(o.rate_limit_burst),
            "LLMFABRIC_XDS_TENANT_RATE_LIMITS": o.tenant_rate_limits,
        })
        self.services = [*consul, tok, *cache, *tritons, *workers, sched, *fronts, xds]

    def _consul_agent(self) -> list[Service]:
        """A ``consul agent -dev`` (in memory, loopback only) for discovery="consul"."""
        binary = shutil.which("consul")
        if binary is None:
            raise RuntimeError("discovery=consul needs a Consul agent: install `consul` on PATH or pass its address")
        h = self.opts.host
        http_port = free_port(h)
        ports = {flag: str(free_port(h)) for flag in ("-server-port", "-serf-lan-port", "-serf-wan-port")}
        argv = [binary, "agent", "-dev", "-bind", h, "-client", h, "-http-port", str(http_port),
                "-grpc-port", "-1", "-dns-port", "-1", "-hcl", "ports { grpc_tls = -1 }",
                *[x for kv in ports.items() for x in kv]]
        svc = Service("consul", "consul", "", http=f"{h}:{http_port}")
        svc.child = Child("consul", argv, self.state_dir / "logs" / "consul.log")
        return [svc]

    # ------------------------------------------------------------ running
    async def start(self, timeout: float = 180.0) -> None:
        """Start in order; each tier must be SERVING before the next starts."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.services:
            self.plan()
        base_env = dict(os.environ)  # the user's LLMFABRIC_* tuning passes through; ours win
        tritons = [s for s in self.services if s.kind == "tritonserve"]
        tiers = [[s for s in self.services if s.kind in ("tokenizer", "semcache", "tritonserve", "controlplane")],
                 [s for s in self.services if s.kind == "worker"],
                 [s for s in self.services if s.kind == "scheduler"],
                 [s for s in self.services if s.kind == "frontend"]]
        try:
            if not tritons:  # embedded workers load their model alongside the tokenizer
                tiers[:2] = [tiers[0] + tiers[1]]
            consul = [s for s in self.services if s.kind == "consul"]
            if consul:  # everyone registers there: it goes first
                tiers.insert(0, consul)
            for tier in tiers:
                for svc in tier:
                    svc.child.start(base_env)  # type: ignore[union-attr]
                await asyncio.gather(*(self._wait_serving(s, timeout) for s in tier))
                if self.consul_url:  # the next tier finds this one through Consul
                    await self._wait_passing(tier, timeout)
            await self._start_edge(timeout)
        except BaseException:
            self.stop()
            raise
        self._write_state()

    async def _wait_serving(self, svc: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            if not svc.child.alive:  # type: ignore[union-attr]
                raise RuntimeError(f"{svc.name} exited during start; last log lines:\n{svc.child.log_tail()}")  # type: ignore[union-attr]
            if svc.kind == "tritonserve":  # Triton's readiness: the server, then the model
                status = await asyncio.to_thread(_triton_ready, svc.http)
            elif svc.kind == "consul":  # a leader elected: the agent answers catalog queries
                status = await asyncio.to_thread(_consul_ready, svc.http)
            else:
                status = await check(svc.grpc, timeout=1.0)
            if status == "SERVING":
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{svc.name} not SERVING after {timeout:.0f}s (last: {status}); log:\n{svc.child.log_tail()}")  # type: ignore[union-attr]

    async def _wait_passing(self, tier: list[Service], timeout: float) -> None:
        """Until Consul lists every service of ``tier`` as passing (registered, first check done)."""
        wanted: dict[str, int] = {}
        for svc in tier:
            name = CONSUL_NAMES.get(svc.kind)
            if name:
                wanted[name] = wanted.get(name, 0) + 1
        deadline = time.monotonic() + timeout
        for name, count in wanted.items():
            seen = -1
            while (seen := await asyncio.to_thread(_consul_passing, self.consul_url, name)) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{count} {name} instance(s) not passing in Consul after {timeout:.0f}s "
                                       f"(passing: {seen}); see {self.state_dir / 'logs'}")
                await asyncio.sleep(0.1)

    async def _start_edge(self, timeout: float) -> None:
        """Envoy with only a bootstrap: listener, clusters and endpoints come from the control plane."""
        o = self.opts
        xh, xp = self.get("xds").grpc.rsplit(":", 1)
        path = self.state_dir / "envoy.yaml"
        path.write_text(render_ads_bootstrap("llmfabric-edge", o.host, o.admin_port, xh, int(xp)))
        await asyncio.to_thread(validate_config, str(path))
        edge = Service("edge", "envoy", f"{o.host}:{o.edge_port}", metrics=f"{o.host}:{o.admin_port}", http=f"{o.host}:{o.admin_port}")
        edge.child = Child("edge", envoy_command(str(path), base_id=random.randint(1000, 60000)), self.state_dir / "logs" / "edge.log")
        edge.child.start(dict(os.environ))
        self.services.append(edge)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not edge.child.alive:
                raise RuntimeError(f"envoy exited during start:\n{edge.child.log_tail()}")
            if await asyncio.to_thread(_http_ok, f"http://{o.host}:{o.admin_port}/ready"):
                if await check(edge.grpc, timeout=1.0) == "SERVING":
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"envoy not ready after {timeout:.0f}s:\n{edge.child.log_tail()}")

    def stop(self) -> None:
        """Edge first, then frontend, scheduler, workers and tokenizer."""
        children = [s.child for s in reversed(self.services) if s.child is not None]
        stop_all(children, grace=self.opts.drain_seconds + 5)
        with_state = self.state_dir / "stack.json"
        if with_state.exists():
            with_state.unlink()

    def _write_state(self) -> None:
        state = {
            "edge": f"{self.opts.host}:{self.opts.edge_port}",
            "admin": f"{self.opts.host}:{self.opts.admin_port}",
            "services": [_state(s) for s in self.services if s.kind not in ("tritonserve", "consul")],
            "consul": self.consul_url,
            # not under "services": `llmfabric status` checks grpc.health.v1 there, which Triton does not serve
            "triton": [_state(s) for s in self.services if s.kind == "tritonserve"],
        }
        (self.state_dir / "stack.json").write_text(json.dumps(state, indent=2))

    def get(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def of_kind(self, kind: str) -> list[Service]:
        return [s for s in self.services if s.kind == kind]


def _state(s: Service) -> dict:
    return {"name": s.name, "kind": s.kind, "grpc": s.grpc, "metrics": s.metrics, "http": s.http,
            "pid": s.child.proc.pid if s.child and s.child.proc else None}


def _triton_ready(http: str) -> str:
    """"SERVING" once Triton reports itself and the model ready, else what it reports."""
    if not _http_ok(f"http://{http}/v2/health/ready"):
        return "NOT_READY: /v2/health/ready"
    return "SERVING" if _http_ok(f"http://{http}/v2/models/{TRITON_MODEL}/ready") else "NOT_READY: model"


def _consul_passing(url: str, service: str) -> int:
    """How many instances of ``service`` pass their checks (-1: Consul not answering)."""
    try:
        with urllib.request.urlopen(f"{url}/v1/health/service/{service}?passing=1", timeout=2) as resp:  # noqa: S310
            return len(json.loads(resp.read()))
    except (OSError, ValueError):
        return -1


def _consul_ready(http: str) -> str:
    """"SERVING" once the agent reports a leader (``GET /v1/status/leader`` is non-empty)."""
    try:
        with urllib.request.urlopen(f"http://{http}/v1/status/leader", timeout=1) as resp:  # noqa: S310 - loopback
            leader = json.loads(resp.read() or b'""')
    except (OSError, ValueError):
        return "UNREACHABLE"
    return "SERVING" if leader else "NO_LEADER"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback admin
            return resp.status == 200
    except OSError:
        return False

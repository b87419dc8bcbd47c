"""docker-compose.yml's default stack, run as processes (no Docker engine
here): every llmfabric service the compose file names starts with `llmfabric
serve <command>` and exactly the environment `docker-compose config` resolves
for it. Only what Docker itself provides is replaced: container addresses
become loopback ports, `http://consul:8500` the Consul stand-in, the
compose secret and the semcache volume files in a temporary directory, and
the Envoy bootstrap is rendered by the same function for loopback. Health is
decided by each service's own compose healthcheck command. Then a request
goes through the edge with a key from the secret file, and Prometheus's
Consul relabelling (deploy/prometheus/prometheus.yml) is applied to what the
services registered, to scrape each one."""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import re
import subprocess
import urllib.request

import aiohttp
import pytest
import yaml

from fabric_testing import LLMFABRIC_CLI, ConsulProcess, bearer, eventually, http_status, stop_process
from llmfabric.cli.container import SERVICES
from llmfabric.cli.processes import free_port
from llmfabric.gateway.apikeys import generate_api_key
from llmfabric.gateway.render import render_ads_bootstrap

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / ".venv-deploy" / "bin" / "docker-compose"
WAIT = 240.0  # two workers loading a model on a 2-core machine


def resolved_compose() -> dict:
    """`docker-compose config` of the default profile, as Docker would run it."""
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "test"}
    out = subprocess.run([str(COMPOSE), "-f", "docker-compose.yml", "--env-file", ".env.example", "config"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    return yaml.safe_load(out)


def start_order(services: dict) -> list[str]:
    """Names in an order that respects depends_on (others, like consul, are already there)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name not in services:
            return
        for dep in services[name].get("depends_on") or {}:
            visit(dep)
        order.append(name)

    for name in services:
        visit(name)
    return order


class Process:
    """One compose service as a local process."""

    def __init__(self, name: str, spec: dict, tmp: pathlib.Path) -> None:
        self.name = name
        self.command = spec["command"][0] if isinstance(spec["command"], list) else spec["command"]
        self.env = {k: str(v) for k, v in (spec.get("environment") or {}).items()}
        self.healthcheck = spec["healthcheck"]["test"]
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*LLMFABRIC_CLI, "serve", self.command], env={**os.environ, **self.env},
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    async def healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"
        assert self.healthcheck[:3] == ["CMD", "llmfabric", "probe"], self.healthcheck
        res = await asyncio.to_thread(subprocess.run, [*LLMFABRIC_CLI, *self.healthcheck[2:]],
                                      env={**os.environ, **self.env}, capture_output=True)
        return res.returncode == 0

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class ComposeStack:
    def __init__(self, tmp: pathlib.Path, consul: ConsulProcess) -> None:
        self.tmp = tmp
        self.consul = consul
        self.key = generate_api_key()
        self.edge_port, self.ops_port, self.admin_port = free_port(), free_port(), free_port()
        spec = resolved_compose()
        self.spec = spec
        # the default profile: `docker-compose config` lists the gpu profile's services too
        ours = {n: s for n, s in spec["services"].items() if s.get("build") and not s.get("profiles")}
        self.processes = [Process(n, ours[n], tmp) for n in start_order(ours)]

    def localize(self) -> None:
        """Replace what Docker provides (addresses, secret, volume, mount) with local equivalents."""
        secret = self.tmp / "api-keys"
        secret.write_text(f"{self.key}:compose\n")
        xds_port = 0
        for p in self.processes:
            for key, value in list(p.env.items()):
                p.env[key] = value.replace("http://consul:8500", self.consul.url)
            if p.command == "envoy":
                continue
            svc = SERVICES[p.command]
            loc = {"HOST": "127.0.0.1", "ADVERTISE": "127.0.0.1", "PORT": str(free_port()),
                   "METRICS_PORT": str(free_port())}
            if svc.http_port:
                loc["HTTP_PORT"] = str(free_port())
            if p.command == "semcache":
                loc["SNAPSHOT_PATH"] = str(self.tmp / "semcache" / "snapshot.bin")
            if p.command == "xds":
                assert p.env["LLMFABRIC_XDS_API_KEYS_FILE"].startswith("/run/secrets/")
                loc |= {"API_KEYS_FILE": str(secret), "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(self.edge_port),
                        "DESCRIPTOR_PATH": str(ROOT / "build" / "llmfabric.pb")}
                xds_port = int(loc["PORT"])
            p.env.update({svc.prefix + k: v for k, v in loc.items()})
        for p in self.processes:
            if p.command == "envoy":
                mounted = next(v for v in self.spec["services"][p.name]["volumes"]
                               if "/etc/llmfabric/envoy" in str(v))
                assert "bootstrap.yaml" in str(mounted)
                bootstrap = self.tmp / "bootstrap.yaml"
                bootstrap.write_text(render_ads_bootstrap("llmfabric-edge", "127.0.0.1", self.admin_port, "127.0.0.1",
                                                          xds_port, ops_port=self.ops_port, ops_host="127.0.0.1"))
                p.env |= {"LLMFABRIC_ENVOY_BOOTSTRAP": str(bootstrap), "LLMFABRIC_ENVOY_ADMIN_PORT": str(self.admin_port),
                          "LLMFABRIC_ENVOY_BASE_ID": str(random.randrange(1000, 1_000_000)),
                          "LLMFABRIC_ENVOY_CONCURRENCY": "1"}

    async def start(self) -> None:
        started: set[str] = set()
        for p in self.processes:
            if p.command == "envoy":  # its probe asks the image's ops port; here it has another one
                deps = self.spec["services"][p.name].get("depends_on") or {}
                await self._wait_healthy([q for q in self.processes if q.name in deps])
                p.start()
                await eventually(lambda: http_status(f"http://127.0.0.1:{self.ops_port}/ready") == 200, timeout=WAIT,
                                 interval=0.2, what=f"envoy ready:\n{p.tail()}")
                continue
            deps = self.spec["services"][p.name].get("depends_on") or {}
            for dep, cond in deps.items():
                assert cond.get("condition") == "service_healthy", (p.name, dep, cond)
            await self._wait_healthy([q for q in self.processes if q.name in deps and q.name in started])
            p.start()
            started.add(p.name)
        await self._wait_healthy([p for p in self.processes if p.command != "envoy"])

    async def _wait_healthy(self, procs: list[Process]) -> None:
        for q in procs:
            try:
                await eventually(q.healthy, timeout=WAIT, interval=0.5, what=f"{q.name} healthy")
            except AssertionError as err:
                raise AssertionError(f"{err}\n{q.tail()}") from None

    def stop(self) -> None:
        for p in reversed(self.processes):
            if p.proc is not None:
                stop_process(p.proc)


@pytest.fixture(scope="module")
async def compose(consul: ConsulProcess, tmp_path_factory: pytest.TempPathFactory):
    stack = ComposeStack(tmp_path_factory.mktemp("compose"), consul)
    stack.localize()
    try:
        await stack.start()
        yield stack
    finally:
        stack.stop()


async def test_every_llmfabric_service_of_the_compose_file_runs(compose: ComposeStack) -> None:
    names = {p.command for p in compose.processes}
    assert names == {*SERVICES, "envoy"}
    workers = compose.consul.passing("worker")
    assert sorted(w["Service"]["Meta"]["worker_id"] for w in workers) == ["worker-0", "worker-1"]


async def test_openai_stream_through_the_edge_with_the_secret_key(compose: ComposeStack) -> None:
    url = f"http://127.0.0.1:{compose.edge_port}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "stream": True, "temperature": 0}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as resp:
            assert resp.status == 401
        async with session.post(url, json=body, headers=bearer(compose.key)) as resp:
            assert resp.status == 200, await resp.text()
            text = await resp.text()
    assert text.rstrip().endswith("data: [DONE]")
    assert '"content"' in text


def _relabel(target: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """Prometheus relabel_configs (keep, replace, labelmap) on one target's labels."""
    labels = dict(target)
    for rule in rules:
        action = rule.get("action", "replace")
        regex = re.compile(f"^(?:{rule.get('regex', '(.*)')})$")
        if action == "labelmap":
            for name, value in list(labels.items()):
                if m := regex.match(name):
                    labels[m.expand(rule.get("replacement", "$1").replace("$", "\\"))] = value
            continue
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        m = regex.match(value)
        if action == "keep":
            if not m:
                return None
        elif action == "replace" and m:
            labels[rule["target_label"]] = m.expand(rule.get("replacement", "$1").replace("$", "\\"))
    return labels


async def test_prometheus_finds_and_scrapes_every_service_through_consul(compose: ComposeStack) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j.get("consul_sd_configs"))
    scraped = {}
    for name in job["consul_sd_configs"][0]["services"]:
        for entry in compose.consul.passing(name):
            svc = entry["Service"]
            meta = {f"__meta_consul_service_metadata_{k}": v for k, v in svc["Meta"].items()}
            target = {"__address__": f"{svc['Address']}:{svc['Port']}", "__meta_consul_service": svc["Service"],
                      "__meta_consul_service_address": svc["Address"], "__meta_consul_service_id": svc["ID"],
                      "__meta_consul_address": entry["Node"]["Address"], **meta}
            labels = _relabel(target, job["relabel_configs"])
            assert labels is not None, svc
            with urllib.request.urlopen(f"http://{labels['__address__']}/metrics", timeout=5) as resp:  # noqa: S310
                scraped[labels["job"]] = resp.read().decode()
    assert set(scraped) == set(SERVICES)
    assert "llmfabric_worker_inter_token_seconds_bucket" in scraped["worker"]
    assert "llmfabric_scheduler_queue_depth" in scraped["scheduler"]
    envoy = next(j for j in config["scrape_configs"] if j["job_name"] == "envoy")
    assert envoy["static_configs"][0]["targets"] == ["envoy:9902"] and envoy["metrics_path"] == "/stats/prometheus"
    assert http_status(f"http://127.0.0.1:{compose.ops_port}{envoy['metrics_path']}") == 200

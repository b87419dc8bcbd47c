"""Discovery benchmark: how fast a Consul catalog change reaches Envoy's live traffic.

Runs the real xDS control plane (python -m llmfabric.gateway.controlplane) and Envoy
(ADS bootstrap), the Consul stand-in tests/fakes/consul_agent.py as a process (it runs
the gRPC health checks: 1 s interval, the first within one interval), and in this
process fake frontends: grpc.aio (health SERVING + ListModels naming its Consul service
id) and aiohttp GET /v1/models (same id, registered as the http_port meta). A "base"
frontend stays registered throughout. Two probes send gRPC ListModels and HTTP GET
/v1/models through Envoy's edge listener back to back (--probe-ms apart) and note who
answered. Each iteration measures:
  add     register a new SERVING frontend -> first gRPC and HTTP answers by it
  remove  deregister it (it keeps serving) -> gone from Envoy admin /clusters (both
          clusters) and no answer by it in the next K requests of each probe
  crash   a third frontend, answering for --dwell + U(0, 1) s (a random phase of its 1 s
          check), stops its gRPC and HTTP servers at once -> Envoy stops routing to it: its
          last connection attempt (admin's per-host cx_connect_fail grew; each one retried
          on another host), the outlier_check flag (both clusters), removal; failed requests
Timestamps (time.time(), one host) split each change:
  consul   this script's own blocking query (the control plane's: /v1/health/service/
           frontend?passing&index=N) returns as soon as the index moves: when the change
           became visible in Consul's passing set. Registration -> passing is Consul's
           check stagger (uniform within the 1 s interval) plus one check.
  cp       the control plane's log lines "consul instances changed" (heard) and "snapshot
           published" (ms timestamps read back from its JSON log: no polling, no load).
  admin    Envoy admin /clusters polled every --admin-ms: first poll (not) listing the
           host in frontend_grpc and frontend_http. With "cp" this is the baseline of
           where the time goes: Consul -> publish -> Envoy config -> traffic.
  traffic  arrival of the first (add) / last (remove) answer by the host; resolution about
           a probe gap (Envoy picks among the 2 idle hosts at random: ~2 gaps to hit a new one).
Bar (the issue): a change in Consul reaches Envoy's live traffic within 1 s, counted from
the consul timestamp; PASS when the run's max is within it. The JSON also holds every
sample, each failed probe (time, ms, error) and a timeline of the steps to place them.
Envoy's access log goes to /dev/null. This event loop also serves the frontends: its lag
(a few ms) shows in the traffic times on a busy host.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import json
import os
import pathlib
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmfabric.cli.processes import free_port
from llmfabric.gateway.edge import envoy_command
from llmfabric.gateway.render import render_ads_bootstrap
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc
from llmfabric.runtime.consul import Registration
from llmfabric.runtime.health import check

from benchlib import pct, save, table  # loadtest/ is on sys.path when run as a script

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "loadtest" / "results" / "bench_discovery.json"
BAR_MS = 1000.0
CLUSTERS = ("frontend_grpc", "frontend_http")
HOSTPORT = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")


class Frontend(inference_pb2_grpc.InferenceServiceServicer):
    """A fake frontend telling who answered: ListModels and GET /v1/models name its service id."""

    def __init__(self, consul_url: str) -> None:
        self.consul_url, self.reg, self.alive, self.id = consul_url, None, False, "?"

    async def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(models=[inference_pb2.Model(name=self.id)])

    async def start(self) -> Frontend:
        self.server, hs = grpc.aio.server(), health.aio.HealthServicer()
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(hs, self.server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.id = f"frontend-127.0.0.1-{self.port}"  # = Registration's service id
        await self.server.start()
        app = web.Application()
        app.router.add_get("/v1/models", lambda _: web.json_response({"object": "list", "data": [{"id": self.id}]}))
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.http_port, self.alive = self.runner.addresses[0][1], True
        self.hosts = [(CLUSTERS[0], f"127.0.0.1:{self.port}"), (CLUSTERS[1], f"127.0.0.1:{self.http_port}")]
        return self

    async def register(self) -> None:
        self.reg = Registration(self.consul_url, "frontend", "127.0.0.1", self.port,
                                meta={"http_port": str(self.http_port)}, check_interval="1s")
        await self.reg.start()

    async def deregister(self) -> None:
        reg, self.reg = self.reg, None
        if reg is not None:
            await reg.stop()

    async def crash(self) -> None:
        """Both listeners gone at once, in-flight calls cut (as if the process died)."""
        self.alive = False
        await asyncio.gather(self.server.stop(None), self.runner.cleanup())

    async def close(self) -> None:
        if self.alive:
            await self.crash()
        await self.deregister()


class Recorder:
    """Timestamped histories: Consul's passing set, Envoy's hosts, probe answers."""

    def __init__(self, consul_url: str, admin_port: int, edge: str) -> None:
        self.consul_url, self.admin, self.edge = consul_url, f"http://127.0.0.1:{admin_port}", edge
        self.consul: list[tuple[float, frozenset]] = []  # (t, passing service ids), on change
        self.envoy: list[tuple[float, dict]] = []  # (t, {(cluster, addr): health_flags}), on change
        self.stats: dict[tuple[str, str], dict] = {}  # last seen per-host counters (kept after removal)
        self.tries: list[tuple[float, tuple[str, str]]] = []  # (t, host) when its cx_connect_fail grew
        self.probes: dict[str, list] = {"grpc": [], "http": []}  # (t_sent, t_done, who | None, error | None)

    async def watch_consul(self, s: aiohttp.ClientSession) -> None:
        index = 0
        while True:
            try:
                q = {"passing": "1", **({"index": str(index), "wait": "30s"} if index else {})}
                async with s.get(f"{self.consul_url}/v1/health/service/frontend", params=q) as r:
                    body, t, new = await r.json(), time.time(), int(r.headers.get("X-Consul-Index", "0"))
                index, ids = (0 if new < index else max(new, 1)), frozenset(e["Service"]["ID"] for e in body)
                if not self.consul or self.consul[-1][1] != ids:
                    self.consul.append((t, ids))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                await asyncio.sleep(0.1)

    async def poll_envoy(self, s: aiohttp.ClientSession, every: float) -> None:
        while True:
            try:
                async with s.get(f"{self.admin}/clusters") as r:
                    text, t, hosts = await r.text(), time.time(), {}
                for p in (line.split("::") for line in text.splitlines()):
                    if len(p) == 4 and p[0] in CLUSTERS and HOSTPORT.fullmatch(p[1]):
                        st = self.stats.setdefault((p[0], p[1]), {})
                        if p[2] == "cx_connect_fail" and st.get(p[2], p[3]) != p[3]:
                            self.tries.append((t, (p[0], p[1])))
                        st[p[2]] = p[3]
                        if p[2] == "health_flags":
                            hosts[(p[0], p[1])] = p[3]
                if not self.envoy or self.envoy[-1][1] != hosts:
                    self.envoy.append((t, hosts))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(every)

    async def probe(self, kind: str, call, every: float) -> None:
        while True:
            t = time.time()
            try:
                who, err = await call(), None
            except Exception as e:  # noqa: BLE001 - a failed request is a sample
                who, err = None, e.code().name if isinstance(e, grpc.aio.AioRpcError) else f"{type(e).__name__}: {e}"
            self.probes[kind].append((t, time.time(), who, err))
            await asyncio.sleep(every)

    def consul_at(self, t0: float, fid: str, present: bool) -> float | None:
        return next((t for t, ids in self.consul if t >= t0 and (fid in ids) == present), None)

    def envoy_at(self, t0: float, hosts: list, present: bool, flag: str = "") -> float | None:
        return next((t for t, h in self.envoy if t >= t0 and all((k in h and flag in h[k]) == present
                                                                  for k in hosts)), None)

    def answered(self, kind: str, fid: str, t0: float, first: bool = True) -> float | None:
        hits = [done for _, done, who, _ in self.probes[kind] if who == fid and done >= t0]
        return (hits[0] if first else hits[-1]) if hits else None

    def serving(self, fe: Frontend, t0: float) -> bool:
        return bool(self.answered("grpc", fe.id, t0) and self.answered("http", fe.id, t0))

    def window(self, t0: float, t1: float) -> list:
        """Requests in flight at t0 or sent by t1."""
        return [p for kind in self.probes for p in self.probes[kind] if p[1] >= t0 and p[0] <= t1]

    def quiet(self, fid: str, since: float, k: int) -> bool:
        tails = [[p for p in v[-k:] if p[0] > since] for v in self.probes.values()]
        return all(len(tail) == k and all(p[2] != fid for p in tail) for tail in tails)


def published(log: pathlib.Path, t0: float, addr: str, present: bool, msg: str = "snapshot published") -> float | None:
    """Time of the control plane's first ``msg`` line at/after t0 whose frontend list has/lacks ``addr``."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("msg") == msg:  # ts: 2025-01-01T00:00:00.123Z (UTC, ms truncated)
            t = calendar.timegm(time.strptime(e["ts"][:19], "%Y-%m-%dT%H:%M:%S")) + int(e["ts"][20:23]) / 1e3
            if t >= t0 - 0.001 and (f"'{addr}'" in str(e.get("frontends_grpc", e.get("instances")))) == present:
                return t
    return None


async def settle(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        await asyncio.sleep(0.02)


def ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a - b) * 1e3


def splits(rec: Recorder, fe: Frontend, log: pathlib.Path, t0: float, present: bool) -> tuple:
    """When the host (dis)appeared in Consul, in Envoy's admin, and in the control plane's publish log."""
    return rec.consul_at(t0, fe.id, present), rec.envoy_at(t0, fe.hosts, present), published(
        log, t0, fe.hosts[0][1], present)


async def add(rec: Recorder, fe: Frontend, log: pathlib.Path, timeout: float) -> dict:
    t0 = time.time()
    await fe.register()
    await settle(lambda: rec.serving(fe, t0) and rec.envoy_at(t0, fe.hosts, True), timeout, f"answers by {fe.id}")
    tc, ta, tp = splits(rec, fe, log, t0, True)
    tg, th = rec.answered("grpc", fe.id, t0), rec.answered("http", fe.id, t0)
    return {"register_to_consul": ms(tc, t0), "consul_to_publish": ms(tp, tc),
            "consul_to_cp_heard": ms(published(log, t0, fe.hosts[0][1], True, "consul instances changed"), tc),
            "publish_to_envoy_admin": ms(ta, tp), "consul_to_envoy_admin": ms(ta, tc),
            "envoy_admin_to_traffic": ms(max(tg, th), ta), "consul_to_grpc": ms(tg, tc), "consul_to_http": ms(th, tc),
            "consul_to_serving": ms(max(tg, th), tc), "register_to_serving": ms(max(tg, th), t0),
            "failed_requests": sum(p[3] is not None for p in rec.window(t0, time.time()))}


async def remove(rec: Recorder, fe: Frontend, log: pathlib.Path, timeout: float, k: int) -> dict:
    t0 = time.time()
    await fe.deregister()
    await settle(lambda: (ta := rec.envoy_at(t0, fe.hosts, False)) and rec.quiet(fe.id, ta, k), timeout,
                 f"traffic leaving {fe.id}")
    tc, ta, tp = splits(rec, fe, log, t0, False)
    lg, lh = rec.answered("grpc", fe.id, t0, first=False), rec.answered("http", fe.id, t0, first=False)
    return {"deregister_to_consul": ms(tc, t0), "consul_to_publish": ms(tp, tc), "publish_to_envoy_admin": ms(ta, tp),
            "consul_to_envoy_admin": ms(ta, tc), "consul_to_last_grpc": ms(lg, tc), "consul_to_last_http": ms(lh, tc),
            "consul_to_stopped": ms(max(x for x in (ta, lg, lh) if x is not None), tc),
            "failed_requests": sum(p[3] is not None for p in rec.window(t0, time.time()))}


async def crash(rec: Recorder, fe: Frontend, log: pathlib.Path, timeout: float) -> dict:
    fails = lambda: sum(int(rec.stats.get(h, {}).get("cx_connect_fail", 0)) for h in fe.hosts)
    before, t0 = fails(), time.time()
    await fe.crash()
    await settle(lambda: (ta := rec.envoy_at(t0, fe.hosts, False)) and all(  # every request sent by ta + 0.3 done
        v[-1][0] > ta + 0.3 for v in rec.probes.values()), timeout, f"Envoy dropping crashed {fe.id}")
    tc, ta, tp = splits(rec, fe, log, t0, False)
    ejected = [rec.envoy_at(t0, [h], True, "failed_outlier_check") for h in fe.hosts]
    last_try = max((t for t, h in rec.tries if t >= t0 and h in fe.hosts), default=t0)
    win = rec.window(t0, ta + 0.3)
    return {"crash_to_consul": ms(tc, t0), "consul_to_publish": ms(tp, tc), "publish_to_envoy_admin": ms(ta, tp),
            "consul_to_envoy_admin": ms(ta, tc), "crash_to_envoy_admin_removed": ms(ta, t0),
            "crash_to_outlier_flag": ms(None if None in ejected else max(ejected), t0),
            "crash_to_last_envoy_attempt": ms(last_try, t0), "envoy_connect_failures": fails() - before,
            "requests_in_window": len(win), "failed_requests": sum(p[3] is not None for p in win),
            "failures": [(round((p[0] - t0) * 1e3), round((p[1] - p[0]) * 1e3), p[3]) for p in win if p[3]],
            "slowest_request_ms": max((p[1] - p[0]) * 1e3 for p in win)}


def spawn(argv: list[str], log: pathlib.Path, **kw) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stderr=out, **{"stdout": out, **kw})


def stop(p: subprocess.Popen) -> None:
    """SIGTERM (Envoy: its process group), SIGKILL after 10 s."""
    kill = (lambda sig: os.killpg(p.pid, sig)) if p.args[0].endswith("envoy") else p.send_signal
    with contextlib.suppress(ProcessLookupError):
        kill(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            kill(signal.SIGKILL)
            p.wait(5)


async def wait_up(ok, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await ok():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not come up")
        await asyncio.sleep(0.2)


async def run(args: argparse.Namespace) -> dict:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_discovery-"))
    procs, tasks, fronts, sessions, channel = [], [], [], [], None
    load_before, samples = os.getloadavg(), {"add": [], "remove": [], "crash": []}
    try:
        procs.append(consul := spawn([sys.executable, str(REPO / "tests/fakes/consul_agent.py"), "--port", "0"],
                                     tmp / "consul.log", stdout=subprocess.PIPE, text=True))
        consul_url = re.search(r"url=(\S+)", await asyncio.wait_for(asyncio.to_thread(consul.stdout.readline), 30))[1]
        xds_port, edge_port, admin_port = free_port(), free_port(), free_port()
        cp_log = tmp / "controlplane.log"
        env = {**os.environ, "LLMFABRIC_XDS_PORT": str(xds_port), "LLMFABRIC_XDS_METRICS_PORT": "-1",
               "LLMFABRIC_XDS_CONSUL": consul_url, "LLMFABRIC_XDS_FRONTEND": "consul:frontend",
               "LLMFABRIC_XDS_AUTH": "false", "LLMFABRIC_XDS_LISTEN_HOST": "127.0.0.1",
               "LLMFABRIC_XDS_LISTEN_PORT": str(edge_port), "LLMFABRIC_XDS_RATE_LIMIT_RPS": "0",
               "LLMFABRIC_XDS_DESCRIPTOR_PATH": str(REPO / "build" / "llmfabric.pb"),
               "LLMFABRIC_XDS_ACCESS_LOG_PATH": "/dev/null", "LLMFABRIC_PARENT_PID": str(os.getpid())}
        procs.append(cp := spawn([sys.executable, "-m", "llmfabric.gateway.controlplane"], cp_log, env=env))
        fronts.append(base := await Frontend(consul_url).start())
        await base.register()

        async def cp_ready() -> bool:
            return await check(f"127.0.0.1:{xds_port}") == "SERVING"

        await wait_up(cp_ready, cp, f"control plane (see {cp_log})")
        (boot := tmp / "envoy.yaml").write_text(
            render_ads_bootstrap("bench-discovery", "127.0.0.1", admin_port, "127.0.0.1", xds_port))
        procs.append(envoy := spawn(envoy_command(str(boot), base_id=random.randint(10_000, 60_000)),
                                    tmp / "envoy.log", start_new_session=True))
        sessions += [aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) for _ in range(2)]
        rec = Recorder(consul_url, admin_port, f"127.0.0.1:{edge_port}")

        async def envoy_ready() -> bool:
            try:
                async with sessions[0].get(f"{rec.admin}/ready") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_up(envoy_ready, envoy, f"Envoy (see {tmp / 'envoy.log'})")
        stub = inference_pb2_grpc.InferenceServiceStub(channel := grpc.aio.insecure_channel(rec.edge))

        async def grpc_call() -> str:
            return (await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)).models[0].name

        async def http_call() -> str:
            async with sessions[1].get(f"http://{rec.edge}/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                return (await r.json())["data"][0]["id"]

        every = args.probe_ms / 1e3
        tasks += [asyncio.create_task(c) for c in (
            rec.watch_consul(sessions[0]), rec.poll_envoy(sessions[0], args.admin_ms / 1e3),
            rec.probe("grpc", grpc_call, every), rec.probe("http", http_call, every))]
        t_start = time.time() - 1
        await settle(lambda: rec.serving(base, t_start), 60, "answers by the base frontend through Envoy")
        t_start, timeline = time.time(), samples.setdefault("timeline", [])  # (s since start, step)
        mark = lambda step: timeline.append((round(time.time() - t_start, 3), f"{i + 1}:{step}"))
        for i in range(args.iterations):
            await settle(lambda: rec.envoy and set(rec.envoy[-1][1]) == set(base.hosts), 30, "Envoy back to base")
            fronts.append(fe := await Frontend(consul_url).start())
            mark("add")
            samples["add"].append(await add(rec, fe, cp_log, args.timeout))
            await asyncio.sleep(args.dwell)
            mark("remove")
            samples["remove"].append(await remove(rec, fe, cp_log, args.timeout, args.k))
            mark("stop removed")
            await fe.close()
            fronts.append(fc := await Frontend(consul_url).start())
            mark("add crash target")
            t_reg = time.time()
            await fc.register()
            await settle(lambda fc=fc, t=t_reg: rec.serving(fc, t), args.timeout, f"answers by {fc.id}")
            await asyncio.sleep(args.dwell + random.random())  # crash at a random phase of the 1 s check
            mark("crash")
            samples["crash"].append(await crash(rec, fc, cp_log, args.timeout))
            mark("deregister crashed")
            await fc.close()
            (a, r, c), f = (samples[x][-1] for x in ("add", "remove", "crash")), lambda v: "-" if v is None else f"{v:.0f}"
            print(f"[{i + 1}/{args.iterations}] add {f(a['consul_to_serving'])} ms (from register "
                  f"{f(a['register_to_serving'])}), remove {f(r['consul_to_stopped'])} ms, crash: last attempt "
                  f"{f(c['crash_to_last_envoy_attempt'])} ms, removed {f(c['crash_to_envoy_admin_removed'])} ms, "
                  f"{c['failed_requests']} failed", file=sys.stderr)
        samples["probes"] = {k: {"sent": len(w := [p for p in v if p[0] >= t_start]), "failures": [
            (round(p[0] - t_start, 3), round((p[1] - p[0]) * 1e3), p[3]) for p in w if p[3]]} for k, v in rec.probes.items()}
    except BaseException:
        print(f"failed; logs kept in {tmp}", file=sys.stderr)
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for fe in fronts:
            try:
                await asyncio.wait_for(fe.close(), 5)
            except Exception as e:  # noqa: BLE001 - best-effort cleanup
                print(f"cleanup of {fe.id}: {e!r}", file=sys.stderr)
        await asyncio.gather(*(s.close() for s in sessions), *([channel.close()] if channel else []))
        for p in reversed(procs):  # Envoy, control plane, Consul
            stop(p)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"machine": {"nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                        "platform": platform.platform(), "python": platform.python_version()},
            "args": vars(args) | {"out": str(args.out)}, "bar_ms": BAR_MS, "summary": summarize(samples),
            "samples": samples}


def summarize(samples: dict) -> dict:
    out = {}
    for phase in ("add", "remove", "crash"):
        for key in samples[phase][0] if samples[phase] else ():
            vals = [s[key] for s in samples[phase] if isinstance(s[key], (int, float))]
            if vals:
                out[f"{phase}.{key}"] = {"n": len(vals), "p50": pct(vals, 50), "p95": pct(vals, 95),
                                         "max": max(vals), "sum": sum(vals)}
    return out


def verdict(s: dict, key: str) -> str:
    if (x := s.get(key)) is None:
        return "no data"
    ok = "PASS" if x["max"] <= BAR_MS else "FAIL (p95 within)" if x["p95"] <= BAR_MS else "FAIL"
    return f"p50 {x['p50']:.0f} ms, p95 {x['p95']:.0f} ms, max {x['max']:.0f} ms (bar {BAR_MS:.0f} ms): {ok}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=20, help="add/remove/crash rounds (default 20)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 iterations, K=20")
    ap.add_argument("--k", type=int, default=50, help="remove: requests per probe with no answer by the host (50)")
    ap.add_argument("--probe-ms", type=float, default=5.0, help="pause between probe requests, ms (default 5)")
    ap.add_argument("--admin-ms", type=float, default=10.0, help="Envoy admin /clusters poll period, ms (default 10)")
    ap.add_argument("--dwell", type=float, default=0.5, help="seconds of traffic before a remove/crash (default 0.5)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-step timeout, s (default 30)")
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = ap.parse_args()
    if args.quick:
        args.iterations, args.k = min(args.iterations, 3), min(args.k, 20)
    if args.iterations < 1 or args.k < 1:
        ap.error("--iterations and --k must be >= 1")
    result = asyncio.run(run(args))
    m, s = result["machine"], result["summary"]
    print(f"\nllmfabric discovery benchmark: {args.iterations} iterations, probes every {args.probe_ms:g} ms, admin "
          f"poll {args.admin_ms:g} ms, K={args.k}\nmachine: {m['nproc']} cpus, load avg {m['loadavg_before'][0]:.2f}"
          f" -> {m['loadavg_after'][0]:.2f}\n")
    table(["phase.metric (ms unless a count)", "n", "p50", "p95", "max"],
          [[k, x["n"], float(x["p50"]), float(x["p95"]), float(x["max"])] for k, x in s.items()])
    print("\nprobes through Envoy:", ", ".join(f"{k} {v['sent']} sent, {len(v['failures'])} failed"
                                             for k, v in result["samples"]["probes"].items()))
    print(f"add    (Consul passing -> first gRPC+HTTP answer by it): {verdict(s, 'add.consul_to_serving')}")
    print(f"remove (Consul deregistered -> Envoy stopped sending):   {verdict(s, 'remove.consul_to_stopped')}")
    save(result, args.out)
    print(f"raw samples and summary: {args.out}")


if __name__ == "__main__":
    main()

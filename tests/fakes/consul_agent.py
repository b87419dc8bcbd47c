"""A stand-in for a Consul dev agent's HTTP API (tests only): ``ConsulAgent`` in-process, or
``python tests/fakes/consul_agent.py --port N`` as a process that prints ``CONSUL_STANDIN_READY port=N url=...``
and stops on SIGTERM/SIGINT (exit 0). ``stop()`` keeps the state (``start()`` again reuses the port; add
``forget_all()`` for a real dev-agent restart); in-flight requests are cut after 0.25s. Logger: ``consul-standin``.

Followed: https://developer.hashicorp.com/consul/api-docs/agent/service, https://developer.hashicorp.com/consul/
api-docs/agent/check, https://developer.hashicorp.com/consul/api-docs/health, https://developer.hashicorp.com/consul/
api-docs/features/blocking, https://developer.hashicorp.com/consul/docs/services/usage/checks, and hashicorp/consul's
agent/{agent,agent_endpoint,health_endpoint,http}.go, agent/checks/{check,grpc}.go, agent/structs/check_type.go.

- ``PUT /v1/agent/service/register[?replace-existing-checks]``: keys match case-insensitively, snake_case too,
  unknown keys ignored; durations are Go duration strings or JSON numbers (ns). 400 with Consul's messages
  ("Missing service name", "Invalid service address", "Invalid check: <CheckType.Validate()>", "Status for checks
  must ...", "Request decode failed: ..."). ``Check`` then ``Checks``; IDs ``service:<id>`` / ``service:<id>:<n>``
  unless ``CheckID``; initial status critical unless ``Status``. Re-registering an ID replaces the service, a check
  that existed keeps its status/output, checks left out stay unless ``replace-existing-checks``; an identical
  re-registration changes no index.
- gRPC checks call grpc.health.v1.Health/Check on ``host:port[/service]`` (fresh channel per run, Timeout default
  10s) every Interval (floor ``check_interval_floor``, Consul: 1s), the first one after a random stagger within one
  Interval; SERVING -> passing "gRPC check <target>: success", else critical "gRPC <target> serving status: X" or
  "rpc error: code = Unavailable desc = ...". TTL checks: ``PUT /v1/agent/check/{pass,warn,fail}/<id>?note=``,
  critical "TTL expired" when late; unknown check 404, non-TTL check 500.
- ``DeregisterCriticalServiceAfter``: a reaper every ``reap_interval`` (Consul: 30s) deregisters a service whose
  check has been critical longer than max(that, ``min_deregister_after``) (Consul: 1m).
- ``PUT /v1/agent/service/deregister/<id>`` (unknown: 404), ``GET /v1/agent/services``, ``/v1/agent/service/<id>``
  (404), ``/v1/agent/checks``, ``/v1/status/leader``, ``/v1/agent/self`` (Config, Member, Meta).
- ``GET /v1/health/service/<name>``: ``passing`` (all checks, the node's serfHealth too, passing), ``tag``
  (repeatable, all required, case-insensitive), ``dc``, ``stale``/``consistent``; blocking ``index``/``wait``
  (default 5m, max 10m, + up to wait/16 jitter; index 0 does not block). One raft-like index is bumped by every
  register/deregister/status change (not by output-only changes); a query reports Consul's per-service index (last
  change to that name; for an unknown name the last time a name vanished, else the global index; never < 1) and
  blocks while it is <= ``index``, also when the client's index is from before ``forget_all(reset_index=True)``:
  it then returns the lower index at the timeout, as Consul does; clients must reset an index that goes backwards.
  Headers X-Consul-Index, -KnownLeader, -LastContact, -Effective-Consistency.
- Unknown path: 404 "404 page not found"; wrong method: 405; errors are text/plain.
- ``forget_all(reset_index=True)`` = a restarted dev agent (in-memory raft): no services/checks, a new node ID, the
  index back to its boot value; ``reset_index=False`` keeps it increasing.

Not implemented (on purpose): HTTP/TCP/UDP/script/docker/alias/H2PING/OS-service checks (400 naming the type),
TLS options beyond ``grpc_use_tls`` (system roots), Success/FailuresBefore* thresholds, ``/v1/agent/check/register``
and ``/update``, catalog/KV/session/ACL/connect endpoints, maintenance, the ``filter``/``near``/``node-meta``/``hash``
/``cached``/``ns``/``peer`` parameters (400 rather than silently ignored), Meta/Weights/TaggedAddresses validation and
auto tagged addresses, namespaces, anti-entropy (agent and catalog views share one state, so output-only changes
show in the catalog at once instead of after Consul's deferred sync).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import re
import signal
import socket
import time
import uuid

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("consul-standin")

VERSION = "1.20.0"  # the Consul version whose API is mimicked
BOOT_INDEX = 13  # a fresh dev agent has made about this many internal raft writes before any user write
DEFAULT_WAIT, MAX_WAIT, JITTER_FRACTION, GRPC_TIMEOUT = 300.0, 600.0, 16, 10.0
STATUSES = ("passing", "warning", "critical")
UNSUPPORTED_PARAMS = {"filter", "near", "node-meta", "peer", "ns", "partition", "hash", "cached",
                      "merge-central-config"}
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d*(?:\.\d*)?)([^\d.]*)")


class HTTPError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_duration(v) -> float:
    """Go's time.ParseDuration for strings, nanoseconds for JSON numbers; in seconds."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise TypeError(f"json: cannot unmarshal {_jtype(v)} into Go value of type time.Duration")
    if not isinstance(v, str):
        return v / 1e9
    s, sign = (v[1:], -1.0 if v[0] == "-" else 1.0) if v[:1] in ("+", "-") else (v, 1.0)
    if s == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(s) or not s:
        num, unit = (m := _PART.match(s, pos)).group(1), m.group(2)
        if num in ("", "."):
            raise ValueError(f'time: invalid duration "{v}"')
        if unit not in _UNITS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{v}"' if unit else
                             f'time: missing unit in duration "{v}"')
        total, pos = total + float(num) * _UNITS[unit], m.end()
    return sign * total


def format_duration(sec: float) -> str:
    """Go's time.Duration.String(): 1s, 1m0s, 1.5s, 500ms."""
    ns, sign = round(abs(sec) * 1e9), "-" if sec < 0 else ""
    num = lambda x: f"{x:.9f}".rstrip("0").rstrip(".")
    if ns < 1_000_000_000:
        unit, size = next(((u, z) for u, z in (("ms", 1e6), ("µs", 1e3), ("ns", 1)) if ns >= z), ("s", 1))
        return f"{sign}{num(ns / size)}{unit}"
    h, rest = divmod(ns, 3600 * 10**9)
    m, rest = divmod(rest, 60 * 10**9)
    return sign + (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{num(rest / 1e9)}s"


def _jtype(v) -> str:
    return {bool: "bool", str: "string", list: "array", dict: "object", type(None): "null"}.get(type(v), "number")


def _keys(obj, gotype: str) -> dict:
    """A JSON object keyed as Consul's decoder matches fields: case-insensitive, snake_case accepted."""
    if obj is not None and not isinstance(obj, dict):
        raise HTTPError(400, f"Request decode failed: json: cannot unmarshal {_jtype(obj)} into Go value of type "
                             f"{gotype}")
    return {str(k).lower().replace("_", ""): v for k, v in (obj or {}).items()}


def _get(d: dict, key: str, typ=str, default=""):
    v = d.get(key)
    if v is not None and (not isinstance(v, typ) or (typ is int and isinstance(v, bool))):
        raise HTTPError(400, f"Request decode failed: json: cannot unmarshal {_jtype(v)} into Go struct field .{key}")
    return default if v is None else v


def _dur(d: dict, key: str) -> float:
    try:
        return parse_duration(d[key]) if d.get(key) is not None else 0.0
    except (TypeError, ValueError) as e:
        raise HTTPError(400, f"Request decode failed: {e}") from None


@dataclasses.dataclass
class Service:
    id: str
    name: str
    tags: list
    address: str
    port: int
    meta: dict
    weights: dict
    enable_tag_override: bool
    create_index: int = 0
    modify_index: int = 0

    def definition(self):
        return self.name, self.tags, self.address, self.port, self.meta, self.weights, self.enable_tag_override


@dataclasses.dataclass
class Check:
    check_id: str
    name: str
    service_id: str
    kind: str  # "grpc" | "ttl"
    target: str = ""
    use_tls: bool = False
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    deregister_after: float = 0.0
    notes: str = ""
    status: str = "critical"
    output: str = ""
    create_index: int = 0
    modify_index: int = 0
    critical_since: float | None = None
    last_ttl_output: str = ""
    task: asyncio.Task | None = None
    timer: asyncio.TimerHandle | None = None

    def definition(self):
        return self.name, self.kind, self.target, self.use_tls, self.interval, self.timeout, self.ttl, \
            self.deregister_after, self.notes


class ConsulAgent:
    """A Consul dev agent (one node, server and client): its agent endpoints and its catalog's health view."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, check_interval_floor: float = 1.0,
                 reap_interval: float = 30.0, min_deregister_after: float = 60.0, node_name: str | None = None,
                 datacenter: str = "dc1"):
        self.host, self.port, self.datacenter = host, port, datacenter
        self.check_interval_floor, self.reap_interval = check_interval_floor, reap_interval
        self.min_deregister_after, self.node_name = min_deregister_after, node_name or socket.gethostname()
        self._addr = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._reset(reset_index=True)
        self._routes = [(m, re.compile(p), h) for m, p, h in (
            ("PUT", r"/v1/agent/service/register", self._h_register),
            ("PUT", r"/v1/agent/service/deregister/(?P<sid>.+)", self._h_deregister),
            ("GET", r"/v1/agent/services", self._h_services),
            ("GET", r"/v1/agent/service/(?P<sid>.+)", self._h_service),
            ("GET", r"/v1/agent/checks", self._h_checks),
            ("PUT", r"/v1/agent/check/(?P<verb>pass|warn|fail)/(?P<cid>.+)", self._h_ttl),
            ("GET", r"/v1/health/service/(?P<name>.+)", self._h_health_service),
            ("GET", r"/v1/status/leader", self._h_leader),
            ("GET", r"/v1/agent/self", self._h_self))]

    @property
    def url(self) -> str:
        return f"http://{self._addr}:{self.port}"

    async def start(self) -> int:
        """Listen (on ``port``; 0 picks one) and run the checks and the reaper; returns the bound port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.25)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        for chk in self.checks.values():
            self._start_runner(chk)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())
        log.info("consul stand-in listening on %s (node %s, dc %s)", self.url, self.node_name, self.datacenter)
        return self.port

    async def stop(self) -> None:
        """Stop listening (in-flight requests are cut after 0.25s) and stop checks; the state is kept."""
        if self._runner is None:
            return
        tasks = [t for t in (self._reaper, *(c.task for c in self.checks.values())) if t]
        for chk in self.checks.values():
            self._stop_runner(chk)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        runner, self._runner, self._reaper = self._runner, None, None
        await runner.cleanup()
        log.info("consul stand-in on port %s stopped", self.port)

    def forget_all(self, reset_index: bool = True) -> None:
        """Simulate an agent restart that lost its state (a dev agent keeps raft in memory)."""
        for chk in self.checks.values():
            self._stop_runner(chk)
        self._reset(reset_index)
        if reset_index:
            self._notify()
        else:
            self._extinction = self._bump()
        log.warning("forgot every service and check; index is now %d", self._index)

    def _reset(self, reset_index: bool) -> None:
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self._svc_index: dict[str, int] = {}
        self._extinction, self._node_id = 0, str(uuid.uuid4())
        if reset_index:
            self._index = BOOT_INDEX

    # ---- state ---------------------------------------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _bump(self, *names: str) -> int:
        self._index += 1
        for name in names:
            if any(s.name == name for s in self.services.values()):
                self._svc_index[name] = self._index
            else:
                self._svc_index.pop(name, None)
                self._extinction = self._index
        self._notify()
        return self._index

    def _query_index(self, name: str) -> int:
        return max(self._svc_index.get(name) or self._extinction or self._index, 1)

    def _remove_service(self, sid: str) -> Service:
        svc = self.services.pop(sid)
        for cid in [cid for cid, c in self.checks.items() if c.service_id == sid]:
            self._stop_runner(self.checks.pop(cid))
        return svc

    def _set_status(self, chk: Check, status: str, output: str) -> None:
        if self.checks.get(chk.check_id) is not chk:
            return
        if status == chk.status:
            chk.output = output  # output-only change: no index bump
            return
        log.info("check %s: %s -> %s: %s", chk.check_id, chk.status, status, output)
        chk.status, chk.output = status, output
        chk.critical_since = time.monotonic() if status == "critical" else None
        chk.modify_index = self._bump(self.services[chk.service_id].name)

    # ---- check runners -------------------------------------------------------------------------------------
    def _start_runner(self, chk: Check) -> None:
        if self._runner is not None and chk.kind == "ttl":
            chk.timer = asyncio.get_running_loop().call_later(chk.ttl, self._ttl_expired, chk)
        elif self._runner is not None:
            chk.task = asyncio.get_running_loop().create_task(self._grpc_loop(chk))

    @staticmethod
    def _stop_runner(chk: Check) -> None:
        for handle in (chk.task, chk.timer):
            if handle:
                handle.cancel()
        chk.task = chk.timer = None

    def _ttl_expired(self, chk: Check) -> None:
        chk.timer, last = None, chk.last_ttl_output
        log.warning("check %s missed its TTL, is now critical", chk.check_id)
        self._set_status(chk, "critical", f"TTL expired (last output before timeout follows): {last}" if last
                         else "TTL expired")

    async def _grpc_loop(self, chk: Check) -> None:
        await asyncio.sleep(random.uniform(0, chk.interval))
        while True:
            self._set_status(chk, *await self._probe(chk))
            await asyncio.sleep(chk.interval)

    @staticmethod
    async def _probe(chk: Check) -> tuple[str, str]:
        server, _, service = chk.target.partition("/")
        try:
            async with (grpc.aio.secure_channel(server, grpc.ssl_channel_credentials()) if chk.use_tls
                        else grpc.aio.insecure_channel(server)) as channel:
                resp = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=chk.timeout or GRPC_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            code = "".join(w.capitalize() for w in e.code().name.split("_"))
            return "critical", f"rpc error: code = {code} desc = {e.details()}"
        except Exception as e:  # noqa: BLE001 - any failure makes the check critical, as in Consul
            return "critical", str(e)
        if resp.status == health_pb2.HealthCheckResponse.SERVING:
            return "passing", f"gRPC check {chk.target}: success"
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return "critical", f"gRPC {chk.target} serving status: {status}"

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            for chk in list(self.checks.values()):
                too_long = max(chk.deregister_after, self.min_deregister_after)
                if (chk.deregister_after > 0 and chk.critical_since is not None and chk.service_id in self.services
                        and time.monotonic() - chk.critical_since > too_long):
                    self._bump(self._remove_service(chk.service_id).name)
                    log.info("check %s for service %s has been critical for too long; deregistered service",
                             chk.check_id, chk.service_id)

    # ---- HTTP ----------------------------------------------------------------------------------------------
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        log.debug("%s %s", request.method, request.path_qs)
        for method, pattern, handler in self._routes:
            if (m := pattern.fullmatch(request.path)) is None:
                continue
            if request.method != method:
                return web.Response(status=405, text=f"method {request.method} not allowed", headers={"Allow": method})
            if unsupported := sorted(UNSUPPORTED_PARAMS & set(request.query)):  # fail loudly rather than ignore
                return web.Response(status=400, text=f"consul-standin does not implement ?{unsupported[0]}")
            try:
                out = await handler(request, **m.groupdict())
            except HTTPError as e:
                return web.Response(status=e.status, text=e.reason)
            except Exception as e:  # Consul answers 500 with the error text
                log.exception("%s %s failed", request.method, request.path)
                return web.Response(status=500, text=str(e))
            if isinstance(out, web.StreamResponse):
                return out
            return web.Response(body=b"" if out is None else json.dumps(out).encode(), content_type="application/json")
        return web.Response(status=404, text="404 page not found")

    async def _h_register(self, request: web.Request) -> None:
        raw = await request.read()
        try:
            d = _keys(json.loads(raw), "structs.ServiceDefinition")
        except ValueError as e:
            raise HTTPError(400, f"Request decode failed: {e if raw.strip() else 'EOF'}") from None
        if not (name := _get(d, "name")):
            raise HTTPError(400, "Missing service name")
        if (address := _get(d, "address")) in ("0.0.0.0", "::", "[::]"):
            raise HTTPError(400, "Invalid service address")
        weights = {"Passing": 1, "Warning": 1}
        if d.get("weights") is not None:
            w = _keys(d["weights"], "structs.Weights")
            weights = {"Passing": _get(w, "passing", int, 0), "Warning": _get(w, "warning", int, 0)}
        tags, meta = _get(d, "tags", list, []), _get(d, "meta", dict, {})
        raw_checks = ([d["check"]] if d.get("check") not in (None, {}) else []) + _get(d, "checks", list, [])
        specs = [self._parse_check(c) for c in raw_checks]
        svc = Service(_get(d, "id") or name, name, tags, address, _get(d, "port", int, 0), meta, weights,
                      bool(d.get("enabletagoverride")))
        self._add_service(svc, specs, replace=request.query.get("replace-existing-checks") in ("", "true"))

    def _parse_check(self, raw) -> dict:
        k = _keys(raw, "structs.CheckType")
        interval, ttl, timeout = _dur(k, "interval"), _dur(k, "ttl"), _dur(k, "timeout")
        dereg = _dur(k, "deregistercriticalserviceafter")
        target = _get(k, "grpc")
        others = [n for n in ("http", "tcp", "udp", "h2ping", "osservice", "args", "scriptargs") if k.get(n)]
        alias = bool(k.get("aliasservice") or k.get("aliasnode"))
        interval_check = bool(target or others)
        problem = ("Interval and TTL cannot both be specified" if interval > 0 and ttl > 0
                   else "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
                   if interval_check and interval <= 0
                   else "TTL must be > 0 for TTL checks" if not interval_check and not alias and ttl <= 0 else None)
        if problem:
            raise HTTPError(400, f"Invalid check: {problem}")
        if (status := _get(k, "status")) and status not in STATUSES:
            raise HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
        if not target and ttl <= 0:
            kind = {"args": "script", "scriptargs": "script"}.get(others[0], others[0]) if others else "alias"
            raise HTTPError(400, f"consul-standin does not run {kind} checks (only grpc and ttl)")
        if target and interval < self.check_interval_floor:
            log.warning("check has interval below minimum of %s", format_duration(self.check_interval_floor))
            interval = self.check_interval_floor
        if 0 < dereg < self.min_deregister_after:
            log.warning("check has deregister interval below minimum of %s", format_duration(self.min_deregister_after))
        return {"check_id": _get(k, "checkid") or _get(k, "id"), "name": _get(k, "name"),
                "kind": "grpc" if target else "ttl", "target": target, "use_tls": bool(k.get("grpcusetls")),
                "interval": interval if target else 0.0, "timeout": timeout, "ttl": 0.0 if target else ttl,
                "deregister_after": dereg, "notes": _get(k, "notes"), "status": status or "critical"}

    def _add_service(self, svc: Service, specs: list[dict], replace: bool) -> None:
        old, names = self.services.get(svc.id), {svc.name}
        if old is not None and old.name != svc.name:
            names.add(self._remove_service(svc.id).name)
            old = None
        changed = old is None or old.definition() != svc.definition()
        new: list[Check] = []
        for i, spec in enumerate(specs):
            cid = spec.pop("check_id") or f"service:{svc.id}" + (f":{i + 1}" if len(specs) > 1 else "")
            chk = Check(cid, spec.pop("name") or f"Service '{svc.name}' check", svc.id, **spec)
            if (prev := self.checks.get(cid)) is not None:  # like Consul's snapshot restore: keep status and output
                chk.status, chk.output, chk.critical_since = prev.status, prev.output, prev.critical_since
                chk.create_index, chk.modify_index = prev.create_index, prev.modify_index
                changed |= prev.definition() != chk.definition() or prev.service_id != svc.id
                self._stop_runner(prev)
            else:
                changed, chk.critical_since = True, time.monotonic() if chk.status == "critical" else None
            new.append(chk)
        keep = {c.check_id for c in new}
        for cid in [c for c, v in self.checks.items() if v.service_id == svc.id and c not in keep] if replace else []:
            self._stop_runner(self.checks.pop(cid))
            changed = True
        self.services[svc.id] = svc
        self.checks.update({c.check_id: c for c in new})
        if changed:
            svc.modify_index = idx = self._bump(*names)
            svc.create_index = old.create_index if old else idx
            for chk in new:
                chk.create_index, chk.modify_index = chk.create_index or idx, idx
        else:
            svc.create_index, svc.modify_index = old.create_index, old.modify_index
        for chk in new:
            self._start_runner(chk)
        log.info("registered service %s (%s) with checks %s%s", svc.id, svc.name, sorted(keep),
                 "" if changed else ", unchanged")

    async def _h_deregister(self, request: web.Request, sid: str) -> None:
        if sid not in self.services:
            raise HTTPError(404, f'Unknown service ID "{sid}". Ensure that the service ID is passed, not the service '
                                 'name.')
        self._bump(self._remove_service(sid).name)
        log.info("deregistered service %s", sid)

    def _svc_json(self, svc: Service, agent_view: bool) -> dict:
        out = {"ID": svc.id, "Service": svc.name, "Tags": list(svc.tags), "Address": svc.address,
               "Meta": dict(svc.meta), "Port": svc.port, "Weights": dict(svc.weights),
               "EnableTagOverride": svc.enable_tag_override}
        if agent_view:
            return {**out, "Datacenter": self.datacenter}
        return {**out, "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}, "Connect": {},
                "CreateIndex": svc.create_index, "ModifyIndex": svc.modify_index}

    def _check_json(self, c: Check, agent_view: bool) -> dict:
        svc, go = self.services[c.service_id], format_duration
        definition = {"Interval": go(c.interval), "Timeout": go(c.timeout), "DeregisterCriticalServiceAfter":
                      go(c.deregister_after), **({"GRPC": c.target, "GRPCUseTLS": c.use_tls} if c.kind == "grpc"
                                                 else {"TTL": go(c.ttl)})}
        return {"Node": self.node_name, "CheckID": c.check_id, "Name": c.name, "Status": c.status, "Notes": c.notes,
                "Output": c.output, "ServiceID": svc.id, "ServiceName": svc.name, "ServiceTags": list(svc.tags),
                "Type": c.kind, "Interval": go(c.interval) if c.interval else "",
                "Timeout": go(c.timeout) if c.timeout else "", "ExposedPort": 0, "Definition": definition,
                "CreateIndex": 0 if agent_view else c.create_index, "ModifyIndex": 0 if agent_view else c.modify_index}

    async def _h_services(self, request: web.Request) -> dict:
        return {sid: self._svc_json(s, True) for sid, s in self.services.items()}

    async def _h_service(self, request: web.Request, sid: str) -> web.Response:
        if sid not in self.services:
            raise HTTPError(404, f"unknown service ID: {sid}")
        out = self._svc_json(self.services[sid], True)
        out["ContentHash"] = hashlib.blake2b(json.dumps(out, sort_keys=True).encode(), digest_size=8).hexdigest()
        return web.json_response(out, headers={"X-Consul-ContentHash": out["ContentHash"]})

    async def _h_checks(self, request: web.Request) -> dict:
        return {cid: self._check_json(c, True) for cid, c in self.checks.items()}

    async def _h_ttl(self, request: web.Request, verb: str, cid: str) -> None:
        if (chk := self.checks.get(cid)) is None:
            raise HTTPError(404, f'Unknown check ID "{cid}". Ensure that the check ID is passed, not the check name.')
        if chk.kind != "ttl":
            raise HTTPError(500, f'CheckID "{cid}" does not have associated TTL')
        if len(output := request.query.get("note", "")) > 4096:
            output = f"{output[:4096]} ... (captured 4096 of {len(output)} bytes)"
        self._set_status(chk, {"pass": "passing", "warn": "warning", "fail": "critical"}[verb], output)
        chk.last_ttl_output = output
        self._stop_runner(chk)
        self._start_runner(chk)

    async def _h_health_service(self, request: web.Request, name: str) -> web.Response:
        q = request.query
        if "stale" in q and "consistent" in q:
            raise HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        if q.get("dc") and q["dc"] != self.datacenter:
            raise HTTPError(500, "No path to datacenter")
        try:
            wait = parse_duration(q["wait"]) if q.get("wait") else 0.0
        except ValueError:
            raise HTTPError(400, "Invalid wait time") from None
        if q.get("index") and not q["index"].isdigit():
            raise HTTPError(400, "Invalid index")
        bools = {"1": True, "t": True, "true": True, "": True, "0": False, "f": False, "false": False}
        if (passing := q.get("passing", "0").lower()) not in bools:
            raise HTTPError(400, "Invalid value for ?passing")
        if index := int(q.get("index") or 0):
            timeout = min(wait, MAX_WAIT) if wait > 0 else DEFAULT_WAIT
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout + random.uniform(0, timeout / JITTER_FRACTION)
            while self._query_index(name) <= index and loop.time() < deadline:
                try:
                    await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
        tags, entries = [t.casefold() for t in q.getall("tag", [])], []
        for svc in sorted((s for s in self.services.values() if s.name == name), key=lambda s: s.id):
            checks = [self._serf_check(), *(self._check_json(c, False) for c in sorted(
                (c for c in self.checks.values() if c.service_id == svc.id), key=lambda c: c.check_id))]
            if (all(t in {x.casefold() for x in svc.tags} for t in tags)
                    and not (bools[passing] and any(c["Status"] != "passing" for c in checks))):
                entries.append({"Node": self._node_json(), "Service": self._svc_json(svc, False), "Checks": checks})
        return web.json_response(entries, headers={
            "X-Consul-Index": str(self._query_index(name)), "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": next((c for c in ("stale", "consistent") if c in q), "leader")})

    def _node_json(self) -> dict:
        a = self._addr
        return {"ID": self._node_id, "Node": self.node_name, "Address": a, "Datacenter": self.datacenter,
                "TaggedAddresses": {"lan": a, "lan_ipv4": a, "wan": a, "wan_ipv4": a},
                "Meta": {"consul-network-segment": "", "consul-version": VERSION},
                "CreateIndex": BOOT_INDEX, "ModifyIndex": BOOT_INDEX}

    def _serf_check(self) -> dict:
        return {"Node": self.node_name, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
                "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "",
                "ServiceTags": [], "Type": "", "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {},
                "CreateIndex": BOOT_INDEX, "ModifyIndex": BOOT_INDEX}

    async def _h_leader(self, request: web.Request) -> str:
        return f"{self._addr}:8300"

    async def _h_self(self, request: web.Request) -> dict:
        return {"Config": {"Datacenter": self.datacenter, "PrimaryDatacenter": self.datacenter,
                           "NodeName": self.node_name, "NodeID": self._node_id, "Revision": "consul-standin",
                           "Server": True, "Version": VERSION},
                "Member": {"Name": self.node_name, "Addr": self._addr, "Port": 8301, "Status": 1,
                           "Tags": {"role": "consul", "dc": self.datacenter, "id": self._node_id, "build": VERSION}},
                "Meta": {"consul-network-segment": ""}}


async def _serve(args: argparse.Namespace) -> None:
    agent = ConsulAgent(args.host, args.port, check_interval_floor=args.check_interval_floor,
                        reap_interval=args.reap_interval, min_deregister_after=args.min_deregister_after)
    port = await agent.start()
    print(f"CONSUL_STANDIN_READY port={port} url={agent.url}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received, stopping")
    await agent.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Consul agent HTTP API stand-in (tests only)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8500, help="0 picks a free port (see the ready line)")
    p.add_argument("--check-interval-floor", type=float, default=1.0)
    p.add_argument("--reap-interval", type=float, default=30.0)
    p.add_argument("--min-deregister-after", type=float, default=60.0)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

"""The control plane process: an ADS server (on the usual ServiceHost, so it
has health, reflection, metrics and Consul registration like every service)
whose snapshot is the edge listener (policy + API keys) and the frontend
clusters/endpoints from the catalog. Catalog changes and key-file edits are
re-rendered and published at once; identical content publishes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import pathlib

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmfabric.gateway.apikeys import ApiKey, load_api_keys_file, parse_api_keys
from llmfabric.gateway.policy import EdgePolicy, RateLimit, parse_tenant_limits
from llmfabric.gateway.render import (
    GRPC_CLUSTER,
    HTTP_CLUSTER,
    render_cluster,
    render_listener,
    render_load_assignment,
    to_proto,
)
from llmfabric.gateway.xds import AdsServer, Snapshot
from llmfabric.runtime.server import ServiceHost
from llmfabric.runtime.upstream import parse_target

from .catalog import Backends, ConsulCatalog, StaticCatalog
from .config import XdsConfig

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
DEFAULT_DESCRIPTOR = pathlib.Path(__file__).resolve().parents[2] / "build" / "llmfabric.pb"


class _Collector:
    """Prometheus view of the ADS server's state."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def collect(self):
        stats = self.plane.ads.stats()
        yield GaugeMetricFamily("llmfabric_xds_streams", "Envoy ADS streams connected", value=stats["streams"])
        yield CounterMetricFamily("llmfabric_xds_responses", "discovery responses sent", value=stats["responses"])
        yield CounterMetricFamily("llmfabric_xds_acks", "discovery responses Envoy accepted", value=stats["acks"])
        yield CounterMetricFamily("llmfabric_xds_nacks", "discovery responses Envoy rejected", value=stats["nacks"])
        yield CounterMetricFamily("llmfabric_xds_publishes", "snapshots published with new content",
                                  value=self.plane.publishes)
        yield GaugeMetricFamily("llmfabric_xds_frontends", "frontend gRPC endpoints in the snapshot",
                                value=len(self.plane.backends.grpc))


class ControlPlane:
    """Catalog + policy -> snapshots -> every connected Envoy."""

    def __init__(self, cfg: XdsConfig, catalog: StaticCatalog | ConsulCatalog | None = None) -> None:
        self.cfg = cfg
        self.tenant_limits = parse_tenant_limits(cfg.tenant_rate_limits, "LLMFABRIC_XDS_TENANT_RATE_LIMITS")
        target = parse_target(cfg.frontend, "LLMFABRIC_XDS_FRONTEND")
        self.catalog = catalog or (ConsulCatalog(cfg.consul, target.consul_service) if target.consul_service
                                   else StaticCatalog(cfg.frontend, cfg.frontend_http))
        self.ads = AdsServer(identifier="llmfabric-xds")
        self.host = ServiceHost("xds", cfg)
        self.host.add(ADS_SERVICE, lambda ads, server: ads.add_to_server(server), self.ads)
        self.host.registry.register(_Collector(self))
        self.keys: tuple[ApiKey, ...] = ()
        self.backends = Backends()
        self.publishes = 0
        self._keys_stamp: bytes | None = None
        self._poll: asyncio.Task | None = None

    # ------------------------------------------------------------ inputs
    def _read_keys(self) -> tuple[ApiKey, ...]:
        keys = parse_api_keys(self.cfg.api_keys, source="LLMFABRIC_XDS_API_KEYS") if self.cfg.api_keys else ()
        if self.cfg.api_keys_file:
            keys += load_api_keys_file(self.cfg.api_keys_file)
        if len({k.key for k in keys}) != len(keys):
            raise ValueError("an API key appears both in API_KEYS and in API_KEYS_FILE")
        return keys

    def _stamp(self) -> bytes | None:
        """The key file's content digest (an edit keeping size and mtime tick is still seen)."""
        try:
            return hashlib.sha256(pathlib.Path(self.cfg.api_keys_file).read_bytes()).digest()
        except OSError:
            return None

    async def _poll_keys(self) -> None:
        """Re-read the key file when it changes; a broken edit keeps the previous keys."""
        while True:
            await asyncio.sleep(self.cfg.keys_poll_seconds)
            stamp = self._stamp()
            if stamp == self._keys_stamp:
                continue
            self._keys_stamp = stamp
            try:
                keys = self._read_keys()
                if self.cfg.auth and not keys:
                    raise ValueError("no keys left (auth is on)")
            except (OSError, ValueError) as exc:
                log.error("API key file rejected; keeping the previous keys",
                          extra={"path": self.cfg.api_keys_file, "error": str(exc)})
                continue
            if keys != self.keys:
                log.info("API keys changed", extra={"keys": len(keys), "tenants": len({k.tenant for k in keys})})
                self.keys = keys
                self.publish()

    def _on_catalog(self, backends: Backends) -> None:
        self.backends = backends
        self.publish()

    # ------------------------------------------------------------ output
    def policy(self) -> EdgePolicy:
        c = self.cfg
        return EdgePolicy(
            descriptor_path=c.descriptor_path or str(DEFAULT_DESCRIPTOR), listen_host=c.listen_host,
            listen_port=c.listen_port, access_log_path=c.access_log_path,
            stream_idle_timeout_s=c.stream_idle_timeout_s, cors_allow_origins=c.cors_origins,
            api_keys=self.keys if c.auth else (), auth_required=c.auth,
            rate_limit=RateLimit(c.rate_limit_rps, c.rate_limit_burst) if c.rate_limit_rps > 0 else None,
            tenant_rate_limits=self.tenant_limits if c.rate_limit_rps > 0 else (),
            max_request_bytes=c.max_request_bytes,
        )

    def snapshot(self) -> Snapshot:
        b = self.backends
        return Snapshot.from_resources(
            listeners=[to_proto("listener", render_listener(self.policy()))],
            clusters=[to_proto("cluster", render_cluster(GRPC_CLUSTER, "grpc", ads=True)),
                      to_proto("cluster", render_cluster(HTTP_CLUSTER, "http", ads=True))],
            endpoints=[to_proto("load_assignment", render_load_assignment(GRPC_CLUSTER, b.grpc)),
                       to_proto("load_assignment", render_load_assignment(HTTP_CLUSTER, b.http))],
        )

    def publish(self) -> None:
        snap = self.snapshot()
        if snap == self.ads.current:
            return
        self.ads.publish(snap)
        self.publishes += 1
        log.info("snapshot published", extra={
            "versions": {t.rsplit(".", 1)[-1]: v for t, v in snap.versions.items()},
            "frontends_grpc": [f"{h}:{p}" for h, p in self.backends.grpc],
            "frontends_http": [f"{h}:{p}" for h, p in self.backends.http], "tenants": len({k.tenant for k in self.keys})})

    # ------------------------------------------------------------ lifecycle
    async def load(self) -> None:
        """Keys (a bad file stops the process), catalog, first snapshot; then follow both."""
        if self.cfg.auth or self.cfg.api_keys or self.cfg.api_keys_file:
            self._keys_stamp = self._stamp() if self.cfg.api_keys_file else None
            self.keys = self._read_keys()
        self.catalog.subscribe(self._on_catalog)
        await self.catalog.start()
        self.backends = self.catalog.backends
        self.publish()
        if self.cfg.api_keys_file:
            self._poll = asyncio.create_task(self._poll_keys(), name="xds-keys-poll")

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        await self.catalog.close()


async def create_server(cfg: XdsConfig, catalog: StaticCatalog | ConsulCatalog | None = None) -> tuple[ControlPlane, int]:
    plane = ControlPlane(cfg, catalog)
    port = await plane.host.start()
    return plane, port

"""State-of-the-world Aggregated Discovery Service (ADS) for Envoy.

One :class:`AdsServer` serves any number of Envoys (one ``StreamAggregatedResources``
stream each) from the current :class:`Snapshot`, per stream and type URL:

* the first request of a type is answered with the current resources: all of them
  for a wildcard subscription (LDS/CDS without names, or ``*``), else those of the
  requested names that exist;
* each response has a fresh nonce; a request echoing an older one is stale and
  ignored; one echoing the latest is an ACK, or a NACK when it has ``error_detail``
  (logged; the node keeps its version; the rejected one is not sent again);
* a response goes out only when the type's version differs from the one last sent
  on the stream or the subscribed names changed, and in make-before-break order
  (CDS, EDS, LDS, RDS, others); a CDS push is followed by the EDS resources, since
  Envoy finishes warming an updated cluster only on a ClusterLoadAssignment response.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from .snapshot import CLUSTER, ENDPOINT, TYPE_ORDER, WILDCARD_TYPES, Snapshot

__all__ = ["AdsServer", "Nack", "StreamStatus", "TypeStatus"]

log = logging.getLogger("llmfabric.gateway.xds")

_WAKE = object()  # inbox item: a new snapshot was published
_EOF = object()  # inbox item: the client closed its side or went away


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


@dataclasses.dataclass(frozen=True, slots=True)
class Nack:
    """A rejected response: the version refused, Envoy's message, when (epoch s)."""

    version: str
    error: str
    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class TypeStatus:
    """One type URL on one stream: versions ACKed and sent ("" if none), the latest
    nonce, the subscription, and the last NACK."""

    acked_version: str
    sent_version: str
    nonce: str
    wildcard: bool
    resource_names: tuple[str, ...]
    last_nack: Nack | None


@dataclasses.dataclass(frozen=True, slots=True)
class StreamStatus:
    """One connected Envoy stream."""

    stream_id: int
    node_id: str
    node_cluster: str
    peer: str
    connected_at: float
    responses: int
    types: Mapping[str, TypeStatus]


class _TypeState:
    def __init__(self) -> None:
        self.explicit = self.wildcard = False
        self.names: frozenset[str] = frozenset()
        self.nonce = self.acked = ""
        self.sent_version: str | None = None  # None: the next pass must answer
        self.sent_sub: tuple[bool, frozenset[str]] | None = None
        self.last_nack: Nack | None = None

    def subscribe(self, type_url: str, names: list[str]) -> None:
        # Legacy wildcard: LDS/CDS with no names, until names are ever given (then an
        # empty list unsubscribes from everything).
        self.explicit = self.explicit or bool(names)
        legacy = type_url in WILDCARD_TYPES and not self.explicit
        self.wildcard = legacy or "*" in names
        self.names = frozenset(names) - {"*"}

    def active(self) -> bool:
        return self.wildcard or bool(self.names)

    def status(self) -> TypeStatus:
        names = tuple(sorted(self.names))
        sent = self.sent_version or ""
        return TypeStatus(
            self.acked, sent, self.nonce, self.wildcard, names, self.last_nack
        )


class _Stream:
    def __init__(self, stream_id: int, peer: str) -> None:
        self.id, self.peer = stream_id, peer
        self.node_id = self.node_cluster = ""
        self.connected_at = time.time()
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.wake_pending = False
        self.types: dict[str, _TypeState] = {}
        self.nonces = itertools.count(1)
        self.responses = 0

    def wake(self) -> None:
        if not self.wake_pending:
            self.wake_pending = True
            self.inbox.put_nowait(_WAKE)


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Serves the current :class:`Snapshot` to every connected Envoy over ADS (SotW)."""

    def __init__(
        self, snapshot: Snapshot | None = None, *, identifier: str = "llmfabric"
    ) -> None:
        self._current = snapshot if snapshot is not None else Snapshot()
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._control_plane = base_pb2.ControlPlane(identifier=identifier)
        counters = ("streams_total", "requests", "responses", "acks", "nacks", "stale")
        self._counters = dict.fromkeys(counters, 0)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the AggregatedDiscoveryService on a grpc.aio server."""
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass

    @property
    def current(self) -> Snapshot:
        """The snapshot being served."""
        return self._current

    def publish(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on and wake every stream, which pushes the types
        whose version changed. Meant for the event loop's thread; from another thread
        it is handed to the loop (taking effect a moment later)."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"expected a Snapshot, got {type(snapshot).__name__}")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        loop = self._loop
        if loop is not None and running is not loop and loop.is_running():
            loop.call_soon_threadsafe(self._install, snapshot)
        else:
            self._install(snapshot)

    def _install(self, snapshot: Snapshot) -> None:
        old, self._current = self._current, snapshot
        types_ = sorted(set(old.versions) | set(snapshot.versions))
        changed = [t for t in types_ if old.version(t) != snapshot.version(t)]
        if not changed:
            log.debug("xds snapshot unchanged")
            return
        summary = ", ".join(
            f"{_short(t)}={snapshot.version(t)} ({len(snapshot.resources(t))})"
            for t in changed
        )
        log.info("xds snapshot published: %s", summary)
        for stream in self._streams.values():
            stream.wake()

    # --- introspection ------------------------------------------------------------

    def streams(self) -> list[StreamStatus]:
        """A point-in-time view of every connected stream."""
        return [
            StreamStatus(
                s.id,
                s.node_id,
                s.node_cluster,
                s.peer,
                s.connected_at,
                s.responses,
                {t: st.status() for t, st in s.types.items()},
            )
            for s in self._streams.values()
        ]

    def stats(self) -> dict:
        """Counters, the served versions and, per connected node id, the last ACKed
        version and the last NACK of each type (JSON-serializable)."""
        nodes: dict[str, dict] = {}
        for s in self._streams.values():
            node = nodes.setdefault(s.node_id, {"acked": {}, "nacked": {}})
            node["streams"] = node.get("streams", 0) + 1
            for t, st in s.types.items():
                if st.acked:
                    node["acked"][t] = st.acked
                if st.last_nack is not None:
                    node["nacked"][t] = dataclasses.asdict(st.last_nack)
        versions = {t: self._current.version(t) for t in (*TYPE_ORDER, *self._current)}
        out = {"streams": len(self._streams), "versions": versions, "nodes": nodes}
        return {**out, **self._counters}

    async def wait_until(self, predicate: Callable[[], object], timeout: float) -> None:
        """Wait until ``predicate()`` holds, re-checked whenever a stream connects,
        disconnects or handles a request; raise TimeoutError after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"xds condition not reached within {timeout}s")
            waiter = loop.create_future()
            self._waiters.append(waiter)
            await asyncio.wait([waiter], timeout=remaining)
            if not waiter.done():
                waiter.cancel()
                self._waiters.remove(waiter)

    async def wait_acked(
        self,
        type_url: str,
        version: str,
        timeout: float = 10.0,
        *,
        node_id: str | None = None,
        min_streams: int = 1,
    ) -> None:
        """Wait until at least ``min_streams`` streams (of ``node_id``, if given) are
        subscribed to ``type_url`` and all such streams have ACKed ``version``."""

        def acked() -> bool:
            states = [
                s.types[type_url]
                for s in self._streams.values()
                if type_url in s.types and node_id in (None, s.node_id)
            ]
            ok = [st.acked == version for st in states if st.active()]
            return len(ok) >= min_streams and all(ok)

        try:
            await self.wait_until(acked, timeout)
        except TimeoutError:
            nodes = self.stats()["nodes"]
            msg = f"{_short(type_url)} {version} not ACKed within {timeout}s: {nodes}"
            raise TimeoutError(msg) from None

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- the protocol -------------------------------------------------------------

    async def DeltaAggregatedResources(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "delta xDS is not served")

    async def StreamAggregatedResources(self, request_iterator, context):
        self._loop = asyncio.get_running_loop()
        stream = _Stream(next(self._ids), context.peer())
        self._streams[stream.id] = stream
        self._counters["streams_total"] += 1
        reader = asyncio.create_task(self._read(request_iterator, stream.inbox))
        try:
            while True:
                items = [await stream.inbox.get()]
                while not stream.inbox.empty():
                    items.append(stream.inbox.get_nowait())
                if any(item is _EOF for item in items):
                    return
                for item in items:
                    if item is _WAKE:
                        stream.wake_pending = False
                    else:
                        self._on_request(stream, item)
                for response in self._responses(stream):
                    await context.write(response)
                    stream.responses += 1
                    self._counters["responses"] += 1
                    self._log_push(stream, response)
                self._notify()
        finally:
            # Forget the stream before awaiting anything: gRPC may cancel this
            # handler during the await, which must not leave a ghost stream.
            self._streams.pop(stream.id, None)
            reader.cancel()
            extra = {"node_id": stream.node_id, "responses": stream.responses}
            log.info("xds stream disconnected: %s", stream.node_id, extra=extra)
            self._notify()
            await asyncio.gather(reader, return_exceptions=True)

    @staticmethod
    def _log_push(stream: _Stream, r: discovery_pb2.DiscoveryResponse) -> None:
        args = (_short(r.type_url), r.version_info, len(r.resources), stream.node_id)
        extra = {"node_id": stream.node_id, "nonce": r.nonce}
        log.info("xds push %s version %s (%d resources) to %s", *args, extra=extra)

    @staticmethod
    async def _read(requests: AsyncIterator, inbox: asyncio.Queue[object]) -> None:
        try:
            async for request in requests:
                inbox.put_nowait(request)
        except Exception as exc:  # noqa: BLE001 - client gone mid-read (reset, deadline)
            log.debug("xds stream read ended: %r", exc)
        inbox.put_nowait(_EOF)

    def _on_request(self, stream: _Stream, req: discovery_pb2.DiscoveryRequest) -> None:
        self._counters["requests"] += 1
        if req.HasField("node") and not stream.node_id:
            stream.node_id, stream.node_cluster = req.node.id, req.node.cluster
            extra = {"node_id": stream.node_id, "peer": stream.peer}
            log.info("xds stream connected: %s", stream.node_id, extra=extra)
        type_url, nonce = req.type_url, req.response_nonce
        if not type_url:
            log.warning("xds request without type_url from %s ignored", stream.node_id)
            return
        st = stream.types.setdefault(type_url, _TypeState())
        if nonce and st.nonce and nonce != st.nonce:
            # Stale: a newer response is on its way; its ACK will carry current names.
            self._counters["stale"] += 1
            log.debug("xds stale %s nonce %s from %s", type_url, nonce, stream.node_id)
            return
        if nonce and st.nonce and req.HasField("error_detail"):
            self._counters["nacks"] += 1
            error = req.error_detail.message
            st.last_nack = Nack(st.sent_version or "", error, time.time())
            log.warning(
                "xds NACK from %s for %s version %s (keeps %s): %s",
                stream.node_id,
                _short(type_url),
                st.last_nack.version,
                req.version_info or "none",
                error,
                extra={"node_id": stream.node_id, "type_url": type_url, "error": error},
            )
        elif nonce and st.nonce:
            self._counters["acks"] += 1
            st.acked = req.version_info
            log.debug("xds ACK from %s for %s %s", stream.node_id, type_url, st.acked)
        else:
            # A new subscription to this type on this stream: answered even if the
            # client already holds the current version (from an earlier stream).
            st.acked = st.acked or req.version_info
            st.sent_version = None
        st.subscribe(type_url, list(req.resource_names))

    def _responses(self, stream: _Stream) -> list[discovery_pb2.DiscoveryResponse]:
        snapshot, out, cds_pushed = self._current, [], False
        order = [t for t in TYPE_ORDER if t in stream.types]
        order += sorted(t for t in stream.types if t not in TYPE_ORDER)
        for type_url in order:
            st = stream.types[type_url]
            sub, version = (st.wildcard, st.names), snapshot.version(type_url)
            if not st.active():
                st.sent_sub = sub  # subscribed to nothing: nothing to send
                continue
            eds_after_cds = type_url == ENDPOINT and cds_pushed
            if st.sent_version == version and st.sent_sub == sub and not eds_after_cds:
                continue
            st.nonce = str(next(stream.nonces))
            st.sent_version, st.sent_sub = version, sub
            resources = snapshot.packed(type_url, None if st.wildcard else st.names)
            out.append(
                discovery_pb2.DiscoveryResponse(
                    version_info=version,
                    resources=resources,
                    type_url=type_url,
                    nonce=st.nonce,
                    control_plane=self._control_plane,
                )
            )
            cds_pushed = cds_pushed or type_url == CLUSTER
        return out

"""An immutable, content-versioned set of xDS resources.

A :class:`Snapshot` maps a type URL to ``{resource name: protobuf message}``.
Each type's version is a short hash of the deterministic serialization of that
type's resources (sorted by name), so the same content always has the same
version, whatever the insertion order or the moment it was built: publishing an
identical snapshot again changes no version and sends nothing to any Envoy.

Messages are copied and serialized once, at construction; the snapshot never
changes afterwards (mutating a message passed in has no effect on it).
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Iterable, Iterator, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "ROUTE",
    "TYPE_ORDER",
    "WILDCARD_TYPES",
    "Snapshot",
    "resource_name",
]

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + listener_pb2.Listener.DESCRIPTOR.full_name
ROUTE = _PREFIX + route_pb2.RouteConfiguration.DESCRIPTOR.full_name
CLUSTER = _PREFIX + cluster_pb2.Cluster.DESCRIPTOR.full_name
ENDPOINT = _PREFIX + endpoint_pb2.ClusterLoadAssignment.DESCRIPTOR.full_name

# Make-before-break push order (xDS protocol, "eventual consistency considerations"):
# clusters, then their endpoints, then listeners, then their routes.
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
# Types Envoy subscribes to with a wildcard (every resource the server has).
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})

# The field that names a resource of each well-known type.
_NAME_FIELD = {
    LISTENER: "name",
    ROUTE: "name",
    CLUSTER: "name",
    ENDPOINT: "cluster_name",
}
_VERSION_CHARS = 16


def resource_name(message: Message) -> str:
    """The xDS name of ``message`` (``cluster_name`` for a ClusterLoadAssignment)."""
    type_url = _PREFIX + message.DESCRIPTOR.full_name
    return getattr(message, _NAME_FIELD.get(type_url, "name"))


def _digest(items: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in items:
        raw = name.encode()
        h.update(
            len(raw).to_bytes(8, "big") + raw + len(data).to_bytes(8, "big") + data
        )
    return h.hexdigest()[:_VERSION_CHARS]


_EMPTY_VERSION = _digest(())


class Snapshot(Mapping[str, Mapping[str, Message]]):
    """type URL -> {resource name -> message}; immutable; versioned per type by content.

    ``resources`` maps each type URL to either ``{name: message}`` (names must match
    the messages' own names for the well-known types) or an iterable of messages
    (named by :func:`resource_name`). A type that is absent is served as empty.
    """

    __slots__ = ("_packed", "_resources", "_versions")

    def __init__(
        self,
        resources: Mapping[str, Mapping[str, Message] | Iterable[Message]]
        | None = None,
    ) -> None:
        by_type: dict[str, Mapping[str, Message]] = {}
        packed: dict[str, Mapping[str, any_pb2.Any]] = {}
        versions: dict[str, str] = {}
        for type_url, group in (resources or {}).items():
            if not type_url.startswith(_PREFIX):
                raise ValueError(f"not a type URL: {type_url!r}")
            if isinstance(group, Mapping):
                named = list(group.items())
            else:
                named = [(resource_name(m), m) for m in group]
            messages: dict[str, Message] = {}
            anys: dict[str, any_pb2.Any] = {}
            for name, message in sorted(named, key=lambda item: item[0]):
                full_name = message.DESCRIPTOR.full_name
                if _PREFIX + full_name != type_url:
                    raise TypeError(f"{full_name} resource {name!r} under {type_url}")
                if not name:
                    raise ValueError(f"{type_url} resource without a name")
                if name in messages:
                    raise ValueError(f"duplicate {type_url} resource {name!r}")
                if type_url in _NAME_FIELD and resource_name(message) != name:
                    raise ValueError(
                        f"{type_url} resource keyed {name!r} is named "
                        f"{resource_name(message)!r}"
                    )
                copy = type(message)()
                copy.CopyFrom(message)
                messages[name] = copy
                data = copy.SerializeToString(deterministic=True)
                anys[name] = any_pb2.Any(type_url=type_url, value=data)
            by_type[type_url] = types.MappingProxyType(messages)
            packed[type_url] = types.MappingProxyType(anys)
            versions[type_url] = _digest((n, a.value) for n, a in anys.items())
        self._resources = types.MappingProxyType(by_type)
        self._packed = types.MappingProxyType(packed)
        self._versions = types.MappingProxyType(versions)

    @classmethod
    def from_resources(
        cls,
        *,
        clusters: Iterable[cluster_pb2.Cluster] = (),
        endpoints: Iterable[endpoint_pb2.ClusterLoadAssignment] = (),
        listeners: Iterable[listener_pb2.Listener] = (),
        routes: Iterable[route_pb2.RouteConfiguration] = (),
    ) -> Snapshot:
        """A snapshot of the four HTTP-routing types, each resource named by itself."""
        return cls(
            {
                CLUSTER: list(clusters),
                ENDPOINT: list(endpoints),
                LISTENER: list(listeners),
                ROUTE: list(routes),
            }
        )

    # Mapping protocol: type URL -> read-only {name: message}.
    def __getitem__(self, type_url: str) -> Mapping[str, Message]:
        return self._resources[type_url]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resources)

    def __len__(self) -> int:
        return len(self._resources)

    def _key(self) -> frozenset[tuple[str, str]]:
        return frozenset(
            (t, v) for t, v in self._versions.items() if v != _EMPTY_VERSION
        )

    def __eq__(self, other: object) -> bool:
        """Same content (an empty type equals an absent one)."""
        if not isinstance(other, Snapshot):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{t.rsplit('.', 1)[-1]}={len(self._resources[t])}@{v}"
            for t, v in self.versions.items()
        )
        return f"Snapshot({parts})"

    def resources(self, type_url: str) -> Mapping[str, Message]:
        """The resources of one type (empty if the type is absent)."""
        return self._resources.get(type_url, types.MappingProxyType({}))

    def version(self, type_url: str) -> str:
        """Content version of one type; an absent type has the version of no resources."""
        return self._versions.get(type_url, _EMPTY_VERSION)

    @property
    def versions(self) -> Mapping[str, str]:
        """type URL -> version, for the types present in this snapshot."""
        return self._versions

    def packed(
        self, type_url: str, names: Iterable[str] | None = None
    ) -> list[any_pb2.Any]:
        """The resources of ``type_url`` as ``Any`` (all of them, or those of ``names``
        that exist), in name order, ready for a DiscoveryResponse."""
        anys = self._packed.get(type_url, {})
        if names is None:
            return list(anys.values())
        return [anys[n] for n in sorted(set(names)) if n in anys]

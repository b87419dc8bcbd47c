"""xDS control plane: an ADS (state-of-the-world) server that pushes content-versioned
snapshots of listeners, routes, clusters and endpoints to Envoy."""

from .ads import AdsServer, Nack, StreamStatus, TypeStatus
from .snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    TYPE_ORDER,
    WILDCARD_TYPES,
    Snapshot,
    resource_name,
)

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "ROUTE",
    "TYPE_ORDER",
    "WILDCARD_TYPES",
    "AdsServer",
    "Nack",
    "Snapshot",
    "StreamStatus",
    "TypeStatus",
    "resource_name",
]

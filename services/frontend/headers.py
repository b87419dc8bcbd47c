"""Request headers the edge and clients set: tenant and priority."""

from __future__ import annotations

from llmfabric.runtime.errors import InvalidArgument

TENANT_HEADER = "x-tenant-id"  # set by the edge from the caller's credentials
PRIORITY_HEADER = "x-priority"  # critical | interactive | batch | background (or 1..4)

_PRIORITIES = {"critical": 1, "interactive": 2, "batch": 3, "background": 4}


def priority_from_header(value: str | None) -> int:
    """common.v1.Priority value of an ``x-priority`` header (0 = not set)."""
    if not value:
        return 0
    v = value.strip().lower().removeprefix("priority_")
    if v in _PRIORITIES:
        return _PRIORITIES[v]
    if v.isdigit() and 1 <= int(v) <= 4:
        return int(v)
    raise InvalidArgument(PRIORITY_HEADER, f"must be one of {', '.join(_PRIORITIES)}, got {value!r}")


def from_metadata(metadata, key: str) -> str:
    for k, v in metadata or ():
        if k == key:
            return str(v)
    return ""

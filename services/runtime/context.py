"""Request-scoped context carried in contextvars (request id, tenant)."""

from __future__ import annotations

import contextvars
import uuid

REQUEST_ID_HEADER = "x-request-id"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def new_request_id() -> str:
    """A fresh, URL-safe request id."""
    return uuid.uuid4().hex


def current_request_id() -> str:
    """The request id of the RPC being served, or "" outside one."""
    return request_id_var.get()


def request_id_from_metadata(metadata) -> str:
    """The x-request-id from gRPC invocation metadata, or a new id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return new_request_id()


def outgoing_metadata(extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """Metadata for a downstream call that propagates the request id."""
    rid = current_request_id()
    base = ((REQUEST_ID_HEADER, rid),) if rid else ()
    return base + tuple(extra)

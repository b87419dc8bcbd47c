"""Domain errors and their one mapping to gRPC status codes.

Service code raises these (they know nothing of gRPC); the interceptor in
``interceptors.py`` turns them into statuses with an ``ErrorInfo`` trailer so
the frontend can produce the right HTTP status and OpenAI error body.
"""

from __future__ import annotations

import grpc

from llmfabric.common.v1 import common_pb2

ERROR_TRAILER = "llmfabric-error-bin"
RETRY_AFTER_TRAILER = "retry-after-ms"


class FabricError(Exception):
    """Base of every error a service reports to its caller."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str = "", retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms

    def info(self) -> common_pb2.ErrorInfo:
        return common_pb2.ErrorInfo(
            code=self.code.name, message=self.message, field=self.field, retry_after_ms=self.retry_after_ms
        )


class InvalidArgument(FabricError):
    """Bad input; ``field`` names the offending request field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message, field=field)


class NotFound(FabricError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(FabricError):
    """Overload: the caller should retry after ``retry_after_ms``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int = 1000) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)


class Unavailable(FabricError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FabricError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FabricError):
    code = grpc.StatusCode.CANCELLED


def error_from_rpc(err: grpc.aio.AioRpcError) -> FabricError:
    """Rebuild the domain error a downstream service reported, so it crosses
    the next hop with the same code, message and details."""
    info = common_pb2.ErrorInfo()
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_TRAILER and isinstance(value, bytes):
            try:
                info.ParseFromString(value)
            except Exception:  # noqa: BLE001 - a bad trailer must not mask the error
                info = common_pb2.ErrorInfo()
    code = err.code()
    out = FabricError(info.message or err.details() or code.name, field=info.field, retry_after_ms=info.retry_after_ms)
    out.code = code
    return out


def trailers_for(error: FabricError) -> tuple[tuple[str, object], ...]:
    """Trailing metadata carrying the error's details."""
    trailers: list[tuple[str, object]] = [(ERROR_TRAILER, error.info().SerializeToString())]
    if error.retry_after_ms:
        trailers.append((RETRY_AFTER_TRAILER, str(error.retry_after_ms)))
    return tuple(trailers)


def info_from_trailers(metadata) -> common_pb2.ErrorInfo:
    """ErrorInfo from trailing metadata (empty if absent)."""
    info = common_pb2.ErrorInfo()
    for key, value in metadata or ():
        if key == ERROR_TRAILER and isinstance(value, bytes):
            try:
                info.ParseFromString(value)
            except Exception:  # noqa: BLE001
                pass
    return info

"""The one server interceptor: request ids, error mapping, RPC metrics.

* ``x-request-id`` from the caller (or a new one) goes into a contextvar, so
  every log line and every downstream call carries it.
* Domain errors (``errors.FabricError``) and errors relayed from downstream
  services become gRPC statuses with an ``ErrorInfo`` trailer; anything else
  is logged with its traceback and reported as INTERNAL without internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .context import request_id_from_metadata, request_id_var
from .errors import FabricError, InvalidArgument, error_from_rpc, trailers_for
from .metrics import RpcMetrics

log = logging.getLogger(__name__)

_SILENT_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _map_exception(exc: BaseException, method: str) -> FabricError:
    if isinstance(exc, FabricError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        return error_from_rpc(exc)
    log.exception("unhandled error in %s", method, exc_info=exc)
    return FabricError(f"internal error in {method.rsplit('/', 1)[-1]}; see server logs (request id {request_id_var.get()})")


async def _abort(context: grpc.aio.ServicerContext, err: FabricError) -> None:
    context.set_trailing_metadata(trailers_for(err))
    await context.abort(err.code, err.message)


class _Undecodable:
    """A request whose bytes did not parse (e.g. a string field with bad UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Let a parse failure reach the handler scope, where it becomes
    INVALID_ARGUMENT instead of gRPC's UNKNOWN."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    return parse


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("request", f"could not be decoded: {request.error}")
    return request


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps unary-unary and unary-stream handlers (the shapes we serve)."""

    def __init__(self, metrics: RpcMetrics | None = None) -> None:
        self.metrics = metrics

    @contextlib.asynccontextmanager
    async def _scope(self, method: str, metadata, context: grpc.aio.ServicerContext):
        """Request id in, error mapped out, outcome counted."""
        # each RPC runs in its own task and context: no reset needed
        request_id_var.set(request_id_from_metadata(metadata))
        start, code = time.perf_counter(), "OK"
        try:
            yield
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:  # the handler aborted with its own status
            status = context.code()
            code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
            raise
        except Exception as exc:  # noqa: BLE001 - mapped here, once for every service
            err = _map_exception(exc, method)
            code = err.code.name
            await _abort(context, err)
        finally:
            if self.metrics is not None:
                self.metrics.observe(method, code, time.perf_counter() - start)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_SILENT_METHODS):
            return handler
        method, metadata = details.method, details.invocation_metadata
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                async with self._scope(method, metadata, context):
                    return await inner(_decoded(request), context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                async with self._scope(method, metadata, context):
                    async for item in inner_stream(_decoded(request), context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

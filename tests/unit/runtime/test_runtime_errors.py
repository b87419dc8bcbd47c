"""runtime.errors without a server: domain errors, trailers, error_from_rpc,
and runtime.context helpers."""

from __future__ import annotations

import grpc
import pytest

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime import context as ctx
from llmfabric.runtime.errors import (
    ERROR_TRAILER,
    RETRY_AFTER_TRAILER,
    Cancelled,
    DeadlineExceeded,
    FabricError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_from_rpc,
    info_from_trailers,
    trailers_for,
)


def rpc_error(code, details="", trailing=()):
    return grpc.aio.AioRpcError(
        code=code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*trailing),
        details=details,
    )


@pytest.mark.parametrize(
    "cls,code",
    [
        (FabricError, grpc.StatusCode.INTERNAL),
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (Unavailable, grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (Cancelled, grpc.StatusCode.CANCELLED),
    ],
)
def test_codes(cls, code):
    err = cls("msg")
    assert err.code is code
    assert isinstance(err, FabricError)
    assert err.info().code == code.name
    assert str(err) == "msg"


def test_invalid_argument_prefixes_field():
    err = InvalidArgument("sampling.temperature", "must be between 0 and 2")
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.field == "sampling.temperature"
    assert err.message == "sampling.temperature: must be between 0 and 2"
    info = err.info()
    assert (info.code, info.field, info.retry_after_ms) == ("INVALID_ARGUMENT", "sampling.temperature", 0)


def test_invalid_argument_without_field():
    err = InvalidArgument("", "bad")
    assert err.message == "bad" and err.field == ""


def test_resource_exhausted_retry_after():
    assert ResourceExhausted("busy").retry_after_ms == 1000
    err = ResourceExhausted("busy", retry_after_ms=2500)
    assert err.info().retry_after_ms == 2500
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_trailers_round_trip():
    err = NotFound("no model", field="model")
    trailers = trailers_for(err)
    assert [k for k, _ in trailers] == [ERROR_TRAILER]
    info = info_from_trailers(trailers)
    assert (info.code, info.message, info.field) == ("NOT_FOUND", "no model", "model")


def test_trailers_carry_retry_after():
    trailers = dict(trailers_for(ResourceExhausted("busy", retry_after_ms=1500)))
    assert trailers[RETRY_AFTER_TRAILER] == "1500"
    assert isinstance(trailers[ERROR_TRAILER], bytes)


def test_info_from_trailers_absent_or_garbage():
    assert info_from_trailers(None) == common_pb2.ErrorInfo()
    assert info_from_trailers((("other", "x"),)) == common_pb2.ErrorInfo()
    assert info_from_trailers(((ERROR_TRAILER, b"\xff\xff\xff"),)) == common_pb2.ErrorInfo()


def test_error_from_rpc_uses_trailer():
    src = InvalidArgument("sampling.top_p", "must be in (0, 1]")
    out = error_from_rpc(rpc_error(src.code, "ignored details", trailers_for(src)))
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT
    assert out.message == src.message
    assert out.field == "sampling.top_p"
    assert isinstance(out, FabricError)


def test_error_from_rpc_keeps_retry_after():
    src = ResourceExhausted("queue full", retry_after_ms=750)
    out = error_from_rpc(rpc_error(src.code, src.message, trailers_for(src)))
    assert (out.code, out.retry_after_ms, out.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 750, "queue full")


def test_error_from_rpc_without_trailer_uses_details():
    out = error_from_rpc(rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert (out.code, out.message, out.field) == (grpc.StatusCode.UNAVAILABLE, "connection refused", "")


def test_error_from_rpc_without_anything_uses_code_name():
    out = error_from_rpc(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, ""))
    assert out.message == "DEADLINE_EXCEEDED"


def test_error_from_rpc_bad_trailer_does_not_mask_error():
    out = error_from_rpc(rpc_error(grpc.StatusCode.NOT_FOUND, "details", [(ERROR_TRAILER, b"\xff\x00garbage")]))
    assert (out.code, out.message, out.field) == (grpc.StatusCode.NOT_FOUND, "details", "")


def test_error_from_rpc_does_not_change_class_code():
    out = error_from_rpc(rpc_error(grpc.StatusCode.NOT_FOUND, "x"))
    assert out.code is grpc.StatusCode.NOT_FOUND
    assert FabricError.code is grpc.StatusCode.INTERNAL  # instance attribute only


# --------------------------------------------------------------- context


def test_request_id_from_metadata():
    assert ctx.request_id_from_metadata((("x-request-id", "abc"),)) == "abc"
    assert ctx.request_id_from_metadata((("other", "1"), ("x-request-id", "r2"))) == "r2"


def test_request_id_truncated():
    assert ctx.request_id_from_metadata((("x-request-id", "a" * 500),)) == "a" * 128


@pytest.mark.parametrize("md", [None, (), (("x-request-id", ""),), (("x-other", "v"),)])
def test_request_id_generated_when_absent(md):
    rid = ctx.request_id_from_metadata(md)
    assert len(rid) == 32 and int(rid, 16) >= 0


def test_new_request_ids_unique():
    assert len({ctx.new_request_id() for _ in range(100)}) == 100


def test_outgoing_metadata_propagates_current_id():
    token = ctx.request_id_var.set("rid-7")
    try:
        assert ctx.current_request_id() == "rid-7"
        assert ctx.outgoing_metadata() == (("x-request-id", "rid-7"),)
        assert ctx.outgoing_metadata((("k", "v"),)) == (("x-request-id", "rid-7"), ("k", "v"))
    finally:
        ctx.request_id_var.reset(token)
    assert ctx.outgoing_metadata() == ()
    assert ctx.current_request_id() == ""

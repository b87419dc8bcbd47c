"""Client-side grpc.health.v1 checks (used by the launcher, `status`, tests)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


async def check(address: str, service: str = "", timeout: float = 2.0) -> str:
    """"SERVING", "NOT_SERVING", ... or "UNREACHABLE: <reason>"."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            return f"UNREACHABLE: {err.code().name}"
    return _NAMES.get(resp.status, str(resp.status))

"""Fixtures for the SGLang engine tests: the stand-in SGLang server
(``tests/fakes/sglang_server.py``, put on ``sys.path`` here) and a real worker
gRPC server in front of it.

``sglang(**kw)`` starts a FakeSGLang; ``worker(fake_or_url, **cfg)`` starts a
worker with ``engine="sglang"`` pointed at it (loaded and SERVING unless
``load=False``); both are stopped at teardown. ``wait_until(predicate)`` polls
until true and fails, never hangs, after a generous timeout.
"""

from __future__ import annotations

import functools
import dataclasses
import pathlib
import sys

import grpc
import pytest

FAKES = pathlib.Path(__file__).resolve().parents[2] / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))

from sglang_server import FakeSGLang  # noqa: E402

from fabric_testing import eventually  # tests/ is on sys.path (tests/conftest.py)

from llmfabric.worker.config import WorkerConfig  # noqa: E402
from llmfabric.worker.server import WorkerService, create_server  # noqa: E402
from llmfabric.worker.v1 import worker_pb2_grpc  # noqa: E402


@dataclasses.dataclass
class Worker:
    svc: WorkerService
    port: int
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerServiceStub


@pytest.fixture
async def sglang():
    started: list[FakeSGLang] = []

    async def start(**kw) -> FakeSGLang:
        fake = FakeSGLang(**kw)
        await fake.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.close()


@pytest.fixture
async def worker():
    started: list[Worker] = []

    async def start(target: FakeSGLang | str, *, load: bool = True, **cfg_kw) -> Worker:
        url = target if isinstance(target, str) else target.url
        cfg = WorkerConfig(port=0, metrics_port=-1, engine="sglang", sglang_url=url, **cfg_kw)
        svc, port = await create_server(cfg)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        w = Worker(svc, port, channel, worker_pb2_grpc.WorkerServiceStub(channel))
        started.append(w)
        if load:
            await svc.load()
            await svc.host.set_serving(True)
        return w

    yield start
    for w in started:
        await w.channel.close()
        await w.svc.host.server.stop(0)
        await w.svc.close()


_eventually = functools.partial(eventually, timeout=10.0, interval=0.02)


@pytest.fixture
def wait_until():
    return _eventually

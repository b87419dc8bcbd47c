"""In-process fixtures for the scheduler tests: fake-engine workers served by
the real worker gRPC server, the real scheduler in front of them, and a
client channel to it.

Nothing here is imported by the tests (no packages under tests/unit): tests
get everything through the ``cluster`` fixture.

The fake engine is scripted per request id (``engine.on(rid, ...)``):
tokens, an ``asyncio.Event`` that holds the request before its first token
(``hold``) or after it (``hold_after_first``), and an exception to raise
before / after the first token. It records which requests started, which
completed, which failed and which were closed early (cancelled), and the
highest number of requests it ever ran at once.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from fabric_testing import eventually  # tests/ is on sys.path (tests/conftest.py)

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import info_from_trailers
from llmfabric.scheduler.config import SchedulerConfig
from llmfabric.scheduler.server import SchedulerService
from llmfabric.scheduler.server import create_server as create_scheduler
from llmfabric.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from llmfabric.structs import Finish, TokenChunk, Usage, ValidatedRequest
from llmfabric.worker.config import WorkerConfig
from llmfabric.worker.engine import EngineInfo, EngineKind, EngineLoad
from llmfabric.worker.server import WorkerService
from llmfabric.worker.server import create_server as create_worker

# ------------------------------------------------------------------ helpers



# ------------------------------------------------------------------ fake engine


@dataclasses.dataclass
class Script:
    """How the fake engine answers one request."""

    tokens: tuple[str, ...] = ("Hel", "lo", ",", " world")  # one chunk each
    delay: float = 0.0  # sleep before each token
    hold: asyncio.Event | None = None  # wait for it before the first token
    hold_after_first: asyncio.Event | None = None  # wait for it after the first token
    fail_before_first: BaseException | None = None  # raised before any token
    fail_after_first: BaseException | None = None  # raised after the first token


class FakeEngine:
    """Implements llmfabric.worker.engine.Engine without a model."""

    def __init__(self, *, capacity: int = 1, context_length: int = 4096, model: str = "fake-model") -> None:
        self.info = EngineInfo(EngineKind.EMBEDDED, model, context_length, capacity)
        self.default = Script()
        self.scripts: dict[str, Script] = {}
        self.requests: dict[str, ValidatedRequest] = {}
        self.started: list[str] = []  # request ids in the order generation began
        self.completed: list[str] = []  # ran to their final chunk
        self.failed: list[str] = []  # raised a scripted error
        self.cancelled: list[str] = []  # generator closed early (caller went away)
        self.active = 0
        self.max_active = 0
        self.load_error: Exception | None = None  # GetLoad raises it (probe failure)
        self.running = False

    def on(self, request_id: str, **kw) -> Script:
        self.scripts[request_id] = Script(**kw)
        return self.scripts[request_id]

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False

    def load(self) -> EngineLoad:
        if self.load_error is not None:
            raise self.load_error
        return EngineLoad(
            running=self.active,
            waiting=0,
            capacity=self.info.capacity,
            kv_used=0,
            kv_free=self.info.context_length * self.info.capacity,
            prompt_tokens_total=0,
            cached_tokens_total=0,
            evictions_total=0,
        )

    async def flush_cache(self) -> int:
        return 0

    async def generate(self, request: ValidatedRequest):
        rid = request.request_id
        script = self.scripts.get(rid, self.default)
        self.requests[rid] = request
        self.started.append(rid)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        outcome = "cancelled"
        try:
            if script.hold is not None:
                await script.hold.wait()
            if script.fail_before_first is not None:
                outcome = "failed"
                raise script.fail_before_first
            n = len(script.tokens)
            for i, text in enumerate(script.tokens):
                if script.delay:
                    await asyncio.sleep(script.delay)
                last = i == n - 1
                yield TokenChunk(
                    token_ids=(100 + i,),
                    text=text,
                    finish=Finish.STOP if last else None,
                    usage=Usage(len(request.prompt_token_ids), n) if last else None,
                )
                if i == 0:
                    if script.hold_after_first is not None:
                        await script.hold_after_first.wait()
                    if script.fail_after_first is not None:
                        outcome = "failed"
                        raise script.fail_after_first
            outcome = "completed"
        finally:
            self.active -= 1
            {"completed": self.completed, "failed": self.failed, "cancelled": self.cancelled}[outcome].append(rid)


# ------------------------------------------------------------------ cluster


@dataclasses.dataclass
class Worker:
    svc: WorkerService
    port: int
    engine: FakeEngine
    worker_id: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def kill(self) -> None:
        """The process dies: every in-flight RPC is aborted, the port closes."""
        await self.svc.host.server.stop(0)


def request_pb(
    rid: str,
    *,
    prompt: tuple[int, ...] = (1, 2, 3),
    priority: int = 0,
    max_tokens: int = 16,
    tenant: str = "",
    cache_salt: str = "",
    stop: tuple[str, ...] = (),
    seed: int | None = None,
) -> common_pb2.TokenizedRequest:
    sampling = common_pb2.SamplingParams(
        temperature=0.0, top_p=1.0, top_k=0, max_tokens=max_tokens, stop=list(stop), repetition_penalty=1.0
    )
    if seed is not None:
        sampling.seed = seed
    return common_pb2.TokenizedRequest(
        request_id=rid,
        model="fake-model",
        prompt_token_ids=list(prompt),
        sampling=sampling,
        tenant=common_pb2.Tenant(id=tenant, cache_salt=cache_salt),
        priority=priority,
    )


@dataclasses.dataclass
class Scheduler:
    svc: SchedulerService
    port: int
    channel: grpc.aio.Channel
    stub: scheduler_pb2_grpc.SchedulerServiceStub

    def submit(self, rid: str, *, timeout: float | None = None, metadata=None, **kw):
        """Start a Submit stream (returns the call; read it or cancel it)."""
        return self.stub.Submit(
            scheduler_pb2.SubmitRequest(request=request_pb(rid, **kw)), timeout=timeout, metadata=metadata
        )

    async def status(self) -> scheduler_pb2.GetStatusResponse:
        return await self.stub.GetStatus(scheduler_pb2.GetStatusRequest(), timeout=5)

    async def run(self, rid: str, **kw) -> list[scheduler_pb2.SubmitResponse]:
        """Submit and read the whole stream (bounded: a hang fails the test)."""
        call = self.submit(rid, **kw)
        return await asyncio.wait_for(collect(call), 10)

    async def queued(self) -> int:
        return (await self.status()).queued


async def collect(call) -> list:
    return [resp async for resp in call]


async def rpc_error(call_or_coro, timeout: float = 10.0) -> tuple[grpc.aio.AioRpcError, list]:
    """Read a stream to its end and return the error it ended with and the
    responses before it; fails if the stream ends without an error."""
    got: list = []

    async def read():
        while (resp := await call_or_coro.read()) is not grpc.aio.EOF:
            got.append(resp)

    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await asyncio.wait_for(read(), timeout)
    return exc_info.value, got


def error_info(err: grpc.aio.AioRpcError) -> common_pb2.ErrorInfo:
    return info_from_trailers(err.trailing_metadata())


def trailer(err: grpc.aio.AioRpcError, key: str):
    for k, v in err.trailing_metadata() or ():
        if k == key:
            return v
    return None


class Cluster:
    """Starts workers and a scheduler in this process; ``close`` stops all."""

    eventually = staticmethod(eventually)
    Script = Script
    collect = staticmethod(collect)
    rpc_error = staticmethod(rpc_error)
    error_info = staticmethod(error_info)
    trailer = staticmethod(trailer)

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self.schedulers: list[Scheduler] = []
        self._services: list[WorkerService] = []

    async def add_worker(
        self, *, capacity: int = 1, context_length: int = 4096, port: int = 0, engine: FakeEngine | None = None
    ) -> Worker:
        engine = engine or FakeEngine(capacity=capacity, context_length=context_length)
        cfg = WorkerConfig(port=port, metrics_port=-1, capacity=engine.info.capacity, worker_id="")
        svc, bound = await create_worker(cfg, engine=engine)
        self._services.append(svc)
        await svc.load()
        await svc.host.set_serving(True)
        w = Worker(svc, bound, engine, svc.servicer.worker_id)
        self.workers.append(w)
        return w

    async def restart(self, worker: Worker) -> Worker:
        """A new worker process on the same port with the same engine."""
        return await self.add_worker(port=worker.port, engine=worker.engine)

    async def start_scheduler(
        self, workers: list[Worker] | list[str] | None = None, *, discovery=None, **cfg_kw
    ) -> Scheduler:
        addrs = tuple(w if isinstance(w, str) else w.address for w in (workers if workers is not None else self.workers))
        cfg_kw.setdefault("probe_interval", 0.1)
        cfg = SchedulerConfig(port=0, metrics_port=-1, workers=addrs, **cfg_kw)
        svc, port = await create_scheduler(cfg, discovery)
        await svc.load()
        await svc.host.set_serving(True)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        s = Scheduler(svc, port, channel, scheduler_pb2_grpc.SchedulerServiceStub(channel))
        self.schedulers.append(s)
        return s

    async def close(self) -> None:
        for s in self.schedulers:
            await s.channel.close()
            await s.svc.host.server.stop(0)
            await s.svc.close()
        for svc in self._services:
            await svc.host.server.stop(0)
            await svc.close()


@pytest.fixture
async def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()

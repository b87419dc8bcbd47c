"""Fixtures for the worker tests: a scripted fake engine behind the real
worker gRPC server, and the real model's vocabulary for the embedded-engine
tests.

Tests import nothing from here (no packages under tests/unit); they use the
fixtures: ``serve`` starts a worker around an engine and returns a client,
``fake_engine`` is a fresh FakeEngine, ``vocab``/``preparer``/``make_request``
build requests with the model's own token ids.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from fabric_testing import ENGINE_THREADS, eventually  # tests/ is on sys.path (tests/conftest.py)

from llmfabric.common.v1 import common_pb2
from llmfabric.models.catalog import ModelNotInstalled, default_model
from llmfabric.structs import Finish, Sampling, TokenChunk, Usage, ValidatedRequest
from llmfabric.worker.config import WorkerConfig
from llmfabric.worker.engine import EngineInfo, EngineKind, EngineLoad
from llmfabric.worker.embedded import EmbeddedEngine
from llmfabric.worker.server import create_server
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc





# ------------------------------------------------------------------ fake engine


class FakeEngine:
    """Implements the Engine protocol; behaviour set by attributes."""

    def __init__(self, *, capacity: int = 3, context_length: int = 128, model: str = "fake-model") -> None:
        self.info = EngineInfo(EngineKind.EMBEDDED, model, context_length, capacity)
        self.tokens: tuple[str, ...] = ("one", " two", " three")
        self.hold_after_first: asyncio.Event | None = None  # block after the first token
        self.fail: BaseException | None = None  # raised before the first token
        self.requests: list[ValidatedRequest] = []
        self.completed: list[str] = []
        self.cancelled: list[str] = []
        self.started = False
        self.stopped = False
        self.flush_result = 17
        self.report = EngineLoad(
            running=1,
            waiting=2,
            capacity=capacity,
            kv_used=300,
            kv_free=9000,
            prompt_tokens_total=1234,
            cached_tokens_total=567,
            evictions_total=8,
        )

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def load(self) -> EngineLoad:
        return self.report

    async def flush_cache(self) -> int:
        return self.flush_result

    async def generate(self, request: ValidatedRequest):
        self.requests.append(request)
        done = False
        try:
            if self.fail is not None:
                raise self.fail
            n = len(self.tokens)
            for i, text in enumerate(self.tokens):
                last = i == n - 1
                yield TokenChunk(
                    token_ids=(10 + i,),
                    text=text,
                    finish=Finish.LENGTH if last else None,
                    usage=Usage(len(request.prompt_token_ids), n, cached_tokens=1) if last else None,
                )
                if i == 0 and self.hold_after_first is not None:
                    await self.hold_after_first.wait()
            done = True
            self.completed.append(request.request_id)
        finally:
            if not done and self.fail is None:
                self.cancelled.append(request.request_id)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


# ------------------------------------------------------------------ worker server


@dataclasses.dataclass
class WorkerClient:
    svc: object
    port: int
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerServiceStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def generate(self, request: common_pb2.TokenizedRequest, timeout: float | None = None):
        return self.stub.Generate(worker_pb2.GenerateRequest(request=request), timeout=timeout)


def tokenized(
    rid: str = "r",
    prompt: tuple[int, ...] = (1, 2, 3),
    max_tokens: int = 8,
    **sampling_kw,
) -> common_pb2.TokenizedRequest:
    sampling = common_pb2.SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=max_tokens, **sampling_kw)
    return common_pb2.TokenizedRequest(
        request_id=rid, model="fake-model", prompt_token_ids=list(prompt), sampling=sampling
    )


@pytest.fixture
async def serve():
    """``await serve(engine, **cfg)`` → a WorkerClient; stopped at teardown
    (the engine is stopped only if ``close_engine``)."""
    started: list[tuple[object, grpc.aio.Channel, bool]] = []

    async def start(engine, *, serving: bool = True, close_engine: bool = True, **cfg_kw) -> WorkerClient:
        cfg_kw.setdefault("metrics_port", -1)
        cfg = WorkerConfig(port=0, capacity=engine.info.capacity, **cfg_kw)
        svc, port = await create_server(cfg, engine=engine)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((svc, channel, close_engine))
        if serving:
            await svc.load()
            await svc.host.set_serving(True)
        return WorkerClient(svc, port, channel, worker_pb2_grpc.WorkerServiceStub(channel))

    yield start
    for svc, channel, close_engine in started:
        await channel.close()
        await svc.host.server.stop(0)
        if close_engine:
            await svc.close()


@pytest.fixture
def make_tokenized():
    return tokenized


@pytest.fixture
def wait_until():
    return eventually


# ------------------------------------------------------------------ the real model's vocabulary


@pytest.fixture(scope="session")
def model_spec():
    try:
        return default_model()
    except ModelNotInstalled as exc:  # pragma: no cover - the dev setup installs it
        pytest.skip(f"model not installed: {exc}")


@pytest.fixture(scope="session")
def vocab(model_spec):
    from llmfabric.models.gguf import GgufModel

    model = GgufModel(model_spec.path, vocab_only=True)
    yield model
    model.close()


@pytest.fixture(scope="session")
def preparer(model_spec, vocab):
    from llmfabric.tokenizer.prepare import Preparer
    from llmfabric.tokenizer.validation import Limits

    return Preparer(model_spec, vocab, Limits(context_length=512))


@pytest.fixture(scope="session")
def make_request(model_spec, vocab, preparer):
    """``make_request(rid, user=... | text=..., **sampling)`` → ValidatedRequest.

    ``user`` goes through the chat template with a system message (without one
    the model may answer in French); ``text`` is a raw completion prompt."""

    def build(
        rid: str,
        *,
        user: str | None = None,
        text: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 32,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> ValidatedRequest:
        if user is not None:
            ids = preparer.tokenize_messages([("system", "You are a helpful assistant."), ("user", user)])
        else:
            assert text is not None
            ids = vocab.tokenize(text, add_special=vocab.add_bos, parse_special=False)
        sampling = Sampling(
            temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=stop, seed=seed
        )
        return ValidatedRequest(rid, model_spec.name, tuple(ids), sampling)

    return build


# ------------------------------------------------------------------ the real embedded engine



@pytest.fixture(scope="module")
async def engine(model_spec):
    eng = EmbeddedEngine(model_spec, context_length=512, capacity=2, **ENGINE_THREADS)
    await eng.start()
    yield eng
    await eng.stop()


@pytest.fixture
async def fresh_engine(model_spec):
    """``await fresh_engine(**kw)``: a private engine, stopped at teardown."""
    made: list[EmbeddedEngine] = []

    async def make(**kw) -> EmbeddedEngine:
        kw.setdefault("context_length", 512)
        kw.setdefault("capacity", 1)
        for k, v in ENGINE_THREADS.items():
            kw.setdefault(k, v)
        eng = EmbeddedEngine(model_spec, **kw)
        await eng.start()
        made.append(eng)
        return eng

    yield make
    for eng in made:
        await eng.stop()

"""Helpers shared by the test suites (tests/ is on sys.path via tests/conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import grpc
import numpy as np

GENERATION_TIMEOUT = 60.0  # bound on any single generation: a hang fails, never blocks the run

# n_threads_batch=1 in engine tests: with 2 threads on a 2-core machine, any
# multi-token llama_decode stalls for up to seconds whenever another process
# competes for the CPU (ggml's thread barrier); results are the same, only
# the wall time is not.
ENGINE_THREADS = {"n_threads": 1, "n_threads_batch": 1}


async def eventually(predicate: Callable[[], object], timeout: float = 5.0, what: str = "", interval: float = 0.01) -> None:
    """Poll ``predicate`` (sync or async) until true; fail (never hang) after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > end:
            raise AssertionError(f"condition not reached within {timeout}s: {what or predicate}")
        await asyncio.sleep(interval)


async def run(engine, request) -> list:
    """Every chunk an engine yields for ``request`` (bounded by GENERATION_TIMEOUT)."""

    async def collect():
        return [c async for c in engine.generate(request)]

    return await asyncio.wait_for(collect(), GENERATION_TIMEOUT)


def text_of(chunks) -> str:
    return "".join(c.text for c in chunks)


def ids_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


class BagOfWords:
    """A stand-in for the semantic cache's embedder (``dim`` + ``embed(texts)``): bag-of-words vectors, so
    questions sharing most words are close. For store/service logic; the real model has its own tests."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def embed(self, texts) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
            out[i] /= np.linalg.norm(out[i]) or 1
        return out


class _Bearer:
    def __init__(self, key: str) -> None:
        self.pair = ("authorization", f"Bearer {key}")

    def _details(self, details):
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), self.pair))


class _AuthUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every unary call (what a client of the edge does)."""

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AuthStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    """The same for server-streaming calls (grpc.aio files an interceptor under one kind only)."""

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def edge_channel(target: str, key: str | None) -> grpc.aio.Channel:
    """A channel to the edge that authenticates every call with ``key`` (None: no credentials)."""
    return grpc.aio.insecure_channel(target, interceptors=[_AuthUnary(key), _AuthStream(key)] if key else None)


def bearer(key: str) -> dict[str, str]:
    """HTTP headers that authenticate with ``key``."""
    return {"authorization": f"Bearer {key}"}


def start_envoy(config: pathlib.Path, tmp: pathlib.Path) -> subprocess.Popen[bytes]:
    """The real Envoy on ``config`` in its own session (logs in ``tmp``), access log flushed every 50 ms."""
    from llmfabric.gateway.edge import envoy_command

    argv = envoy_command(str(config), base_id=random.randrange(1_000, 1_000_000)) + ["--file-flush-interval-msec", "50"]
    with open(tmp / "envoy.out", "wb") as out, open(tmp / "envoy.err", "wb") as err:
        return subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def envoy_ready(admin_port: int, proc: subprocess.Popen, stderr: pathlib.Path) -> None:
    """Until Envoy's admin /ready answers 200; raise with its stderr if it exits or never does."""
    import aiohttp

    url = f"http://127.0.0.1:{admin_port}/ready"
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            if proc.poll() is not None:
                break
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"envoy did not become ready:\n{stderr.read_text()[-4000:]}")


STANDIN = pathlib.Path(__file__).resolve().parent / "fakes" / "consul_agent.py"


class ConsulProcess:
    """The stand-in agent as a child process on a fixed port (restartable, killable)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(STANDIN), "--port", str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("CONSUL_STANDIN_READY"), line

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:  # noqa: S310 - loopback
            return json.loads(resp.read())

    def passing(self, service: str) -> list[dict]:
        return self.get(f"/v1/health/service/{service}?passing=1")


# The CLI as a child process (`llmfabric serve|probe|...` without relying on the console script).
LLMFABRIC_CLI = [sys.executable, "-m", "llmfabric.cli.main"]


def http_status(url: str, method: str = "GET") -> int:
    """The HTTP status of one request (-1 when nothing answers)."""
    import urllib.error

    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310 - loopback
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return -1

"""Engine that fronts an SGLang server through its native HTTP API.

Relied on, as read in sgl-project/sglang (srt/entrypoints/http_server.py; managers/io_struct.py GenerateReqInput,
AbortReq; sampling/sampling_params.py; managers/tokenizer_manager.py; managers/schedule_batch.py FINISH_*.to_json;
metrics/collector.py; docs basic_usage/native_api). GET /health: 200 once ready. GET /server_info (/get_server_info
before the rename): max_total_num_tokens, max_req_input_len, context_length (null unless set), max_running_requests,
incremental_streaming_output (older: stream_output), internal_states[0] (+ effective_max_running_requests_per_dp).
GET /model_info (/get_model_info): model_path. POST /generate {"input_ids", "sampling_params": {max_new_tokens,
temperature, top_p, top_k (-1 disables, 0 is rejected), stop, repetition_penalty, sampling_seed}, "stream": true,
"rid"} -> `data: {"text", "output_ids", "meta_info": {"finish_reason", "prompt_tokens", "completion_tokens",
"cached_tokens"}}` lines (text, output_ids cumulative unless --incremental-streaming-output) then `data: [DONE]`;
finish_reason null | {"type": "stop"|"length"|"abort", "matched"|"length"|"message", "status_code"}. A ValueError
(SGLang's bad request: prompt too long, bad sampling value) comes as `data: {"error": {"message"}}` on the 200
stream; body validation fails before with HTTP 400 {"object": "error", "message"}. POST /abort_request {"rid"}
(some versions match rid prefixes). POST /flush_cache: 200, or 400 while requests run (no token count). GET /metrics
(404 without --enable-metrics): sglang:num_running_reqs, num_queue_reqs, num_used_tokens, token_usage,
max_total_num_tokens, prompt_tokens_total, cached_tokens_total (summed over label sets).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from llmfabric.runtime.errors import DeadlineExceeded, FabricError, InvalidArgument, ResourceExhausted, Unavailable
from llmfabric.structs import Finish, Sampling, TokenChunk, Usage, ValidatedRequest

from .config import WorkerConfig
from .engine import EngineInfo, EngineKind, EngineLoad

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # /metrics poll period
POLL_FAILURES_DOWN = 3  # consecutive unreachable polls before load() reports UNAVAILABLE
CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=10.0)  # info, flush and metrics calls
ABORT_TIMEOUT = aiohttp.ClientTimeout(total=2.0)  # fire-and-forget /abort_request
_SUMMED = {f"sglang:{n}" for n in ("num_running_reqs", "num_queue_reqs", "num_used_tokens", "token_usage",
                                   "max_total_num_tokens", "prompt_tokens_total", "cached_tokens_total")}
_NET_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError)


def _error_text(body: str) -> str:
    """SGLang's message from an error body, whichever of its shapes."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500] or "no details"
    if isinstance(data, dict):
        err = data.get("error")
        data = (err.get("message") if isinstance(err, dict) else err) or data.get("message") or data.get("detail", data)
    return str(data)[:500]


def _classify(status: object, message: str) -> FabricError:
    """The domain error for an HTTP status or an abort's status_code."""
    if status in (400, 413, 422):
        return InvalidArgument("", message)
    return ResourceExhausted(message) if status == 429 else Unavailable(message)


def _sampling_params(s: Sampling) -> dict[str, object]:
    params = {"max_new_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
              "top_k": s.top_k if s.top_k > 0 else -1, "stop": list(s.stop), "repetition_penalty": s.repetition_penalty}
    return params if s.seed is None else {**params, "sampling_seed": s.seed}


def _parse_metrics(text: str) -> dict[str, float]:
    """The sglang:* samples used here, summed over label sets (DP ranks, cache sources)."""
    out: dict[str, float] = {}
    for s in (s for family in text_string_to_metric_families(text) for s in family.samples):
        if s.name in _SUMMED and math.isfinite(s.value):
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def _sse(resp: aiohttp.ClientResponse) -> AsyncIterator[dict | None]:
    """The JSON objects of the ``data:`` lines, None for ``[DONE]``; no line-size limit."""
    buf = bytearray()
    async for chunk in resp.content.iter_any():
        pos = len(buf)
        buf += chunk
        while (nl := buf.find(b"\n", pos)) >= 0:
            line, pos = bytes(buf[:nl]).strip(), 0
            del buf[: nl + 1]
            if not line.startswith(b"data:"):
                continue
            if (payload := line[5:].strip()) == b"[DONE]":
                yield None
                return
            try:
                event = json.loads(payload)
            except ValueError as exc:
                raise Unavailable(f"SGLang sent a malformed stream line: {payload[:200]!r}") from exc
            yield event if isinstance(event, dict) else {}


class SGLangEngine:
    """The Engine protocol over one SGLang server (RadixAttention is SGLang's own)."""

    def __init__(self, cfg: WorkerConfig, *, startup_timeout: float | None = None) -> None:
        self.cfg = cfg
        self.url = cfg.sglang_url.rstrip("/")
        self.startup_timeout = cfg.startup_timeout if startup_timeout is None else startup_timeout
        self.info = EngineInfo(EngineKind.SGLANG, cfg.model_name or "sglang", cfg.context_length, cfg.capacity)
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task | None = None  # the /metrics poll
        self._aborts: set[asyncio.Task] = set()  # /abort_request calls in flight
        self._active: dict[str, bool] = {}  # rid -> has its first token, for our requests in flight
        self._incremental, self._max_total = False, 0  # the server streams deltas; KV pool size in tokens
        self._metrics: dict[str, float] = {}
        self._poll_failures, self._poll_error = 0, ""
        self._prompt_total = self._cached_total = 0  # summed from meta_info

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        try:
            await self._wait_healthy()
            server = await self._get_json("/server_info", "/get_server_info")
            model = await self._get_json("/model_info", "/get_model_info")
        except BaseException:
            await self.stop()
            raise
        states = server.get("internal_states")
        srcs = (server, states[0] if isinstance(states, list) and states and isinstance(states[0], dict) else {})

        def pick(*keys: str) -> int | None:
            found = (src.get(k) for src in srcs for k in keys)
            return next((v for v in found if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)

        self._max_total = pick("max_total_num_tokens") or 0
        self._incremental = any(src.get(k) is True for src in srcs for k in ("incremental_streaming_output",
                                                                              "stream_output"))  # older name
        max_input = pick("max_req_input_len")  # SGLang rejects longer prompts
        windows = [w for w in (self.cfg.context_length, pick("context_length"), max_input and max_input + 1) if w]
        path = str(model.get("model_path") or server.get("served_model_name") or "sglang").rstrip("/")
        capacity = pick("max_running_requests", "effective_max_running_requests_per_dp") or self.cfg.capacity
        name = self.cfg.model_name or path.rsplit("/", 1)[-1] or path
        self.info = EngineInfo(EngineKind.SGLANG, name, min(windows), capacity)
        await self._poll()
        self._poller = asyncio.create_task(self._poll(forever=True), name="sglang-metrics")

    async def stop(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
        for rid in list(self._active):
            self._abort_later(rid)
        await asyncio.gather(*self._aborts, *([poller] if poller else []), return_exceptions=True)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _wait_healthy(self) -> None:
        deadline, last = time.monotonic() + self.startup_timeout, "no answer"
        while (left := deadline - time.monotonic()) > 0:
            try:  # (older servers answer /health by generating one token)
                if (status := (await self._call("GET", "/health", aiohttp.ClientTimeout(total=left)))[0]) == 200:
                    return
                last = f"HTTP {status}"
            except Unavailable as exc:
                last = exc.message
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        raise Unavailable(f"SGLang at {self.url} did not become healthy within {self.startup_timeout:g}s "
                          f"(last GET /health: {last})")

    async def _call(self, method: str, path: str, timeout: aiohttp.ClientTimeout = CONTROL_TIMEOUT,
                    **kw: object) -> tuple[int, str]:
        if self._session is None:
            raise Unavailable("SGLang engine is not started")
        try:
            async with self._session.request(method, self.url + path, timeout=timeout, **kw) as resp:
                return resp.status, await resp.text()
        except _NET_ERRORS as exc:
            raise Unavailable(f"SGLang {method} {path} at {self.url} failed: {type(exc).__name__}: {exc}") from exc

    async def _get_json(self, path: str, legacy: str = "") -> dict:
        status, body = await self._call("GET", path)
        if status == 404 and legacy:
            return await self._get_json(legacy)  # a server from before the /get_* -> /* rename
        try:
            data = json.loads(body) if status == 200 else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise Unavailable(f"SGLang GET {path} answered HTTP {status}: {_error_text(body)}")
        return data

    async def generate(self, request: ValidatedRequest) -> AsyncIterator[TokenChunk]:
        if self._session is None:
            raise Unavailable("SGLang engine is not started")
        rid = request.request_id or uuid.uuid4().hex
        body = {"input_ids": list(request.prompt_token_ids), "sampling_params": _sampling_params(request.sampling),
                "stream": True, "rid": rid}
        text, n_ids, final = "", 0, None  # final: the chunk carrying finish_reason
        self._active[rid] = False
        try:
            try:
                timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout)
                async with self._session.post(self.url + "/generate", json=body, timeout=timeout) as resp:
                    if resp.status != 200:
                        msg = f"SGLang /generate answered HTTP {resp.status}: {_error_text(await resp.text())}"
                        raise _classify(resp.status, msg)
                    async for event in _sse(resp):
                        if event is None:
                            break
                        if final is not None:
                            continue  # read on to [DONE] so the connection is reused
                        if "error" in event:
                            raise InvalidArgument("", f"SGLang rejected the request: {_error_text(json.dumps(event))}")
                        delta = event.get("text") if isinstance(event.get("text"), str) else ""
                        ids = event.get("output_ids") if isinstance(event.get("output_ids"), list) else []
                        if not self._incremental:  # cumulative; a trimmed stop string may shorten the text
                            delta, text = (delta[len(text):] if delta.startswith(text) else ""), delta or text
                            ids, n_ids = ids[n_ids:], max(n_ids, len(ids))
                        meta = event.get("meta_info") or {}
                        reason = meta.get("finish_reason")
                        kind = reason.get("type") if isinstance(reason, dict) else reason
                        if kind == "abort":
                            why = reason.get("message") or "no reason given"
                            raise _classify(reason.get("status_code"), f"SGLang aborted the request: {why}")
                        if reason:
                            usage = Usage(int(meta.get("prompt_tokens") or len(body["input_ids"])),
                                          int(meta.get("completion_tokens") or 0),
                                          int(meta.get("cached_tokens") or 0))
                            final = TokenChunk(tuple(ids), delta, Finish.LENGTH if kind == "length" else Finish.STOP,
                                               usage)
                        elif delta or ids:
                            self._active[rid] = True
                            yield TokenChunk(tuple(ids), delta)
            except _NET_ERRORS as exc:
                if final is None and isinstance(exc, asyncio.TimeoutError):
                    raise DeadlineExceeded(f"SGLang did not finish within {self.cfg.request_timeout:g}s") from exc
                if final is None:
                    where = "mid-stream" if self._active.get(rid) else "before the first token"
                    raise Unavailable(f"SGLang connection failed {where}: {type(exc).__name__}: {exc}") from exc
            if final is None:
                raise Unavailable("SGLang stream ended without a finish_reason")
            self._prompt_total, self._cached_total = (self._prompt_total + final.usage.prompt_tokens,
                                                      self._cached_total + final.usage.cached_tokens)
            yield final
        finally:
            self._active.pop(rid, None)
            if final is None:  # cancelled, failed or cut off: make sure SGLang frees the slot (no-op if it did)
                self._abort_later(rid)

    def _abort_later(self, rid: str) -> None:
        if self._session is not None and not self._session.closed:
            task = asyncio.get_running_loop().create_task(self._abort(rid))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

    async def _abort(self, rid: str) -> None:
        try:
            await self._call("POST", "/abort_request", ABORT_TIMEOUT, json={"rid": rid})
        except Unavailable as exc:  # best effort
            log.warning("%s", exc.message, extra={"request": rid})

    def load(self) -> EngineLoad:
        if self._poll_failures >= POLL_FAILURES_DOWN:
            raise Unavailable(f"SGLang is unreachable: {self._poll_error}")
        m, streaming = self._metrics, sum(self._active.values())
        total = int(m.get("sglang:max_total_num_tokens") or self._max_total)
        used = m.get("sglang:num_used_tokens", m.get("sglang:token_usage", 0.0) * total)
        used = min(int(round(used)), total) if total else int(used)
        running = max(int(m.get("sglang:num_running_reqs", 0)), streaming)
        waiting = max(int(m.get("sglang:num_queue_reqs", 0)), len(self._active) - streaming)
        prompt = max(int(m.get("sglang:prompt_tokens_total", 0)), self._prompt_total)  # the poll may lag ours
        cached = max(int(m.get("sglang:cached_tokens_total", 0)), self._cached_total)
        return EngineLoad(running, waiting, self.info.capacity, used, max(0, total - used), prompt, cached,
                          0)  # evictions: SGLang exports no prefix-cache eviction counter

    async def flush_cache(self) -> int:
        status, body = await self._call("POST", "/flush_cache")
        if status != 200:  # 400 while requests are running
            raise Unavailable(f"SGLang refused /flush_cache (HTTP {status}): {_error_text(body)}")
        return 0  # SGLang does not say how many tokens it dropped

    async def _poll(self, forever: bool = False) -> None:
        """Refresh the /metrics snapshot, every POLL_SECONDS if ``forever``."""
        while True:
            try:
                status, body = await self._call("GET", "/metrics")
                self._poll_failures = 0
                self._metrics = _parse_metrics(body) if status == 200 else {}  # 404: no --enable-metrics
            except Unavailable as exc:
                self._poll_failures, self._poll_error = self._poll_failures + 1, exc.message
            except ValueError as exc:
                log.warning("unreadable SGLang /metrics: %r", exc)
            if not forever:
                return
            await asyncio.sleep(POLL_SECONDS)

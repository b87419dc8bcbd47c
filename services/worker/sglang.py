"""Engine that fronts an SGLang server through its native HTTP API.

What it relies on, checked against sgl-project/sglang (srt/entrypoints/http_server.py;
srt/managers/io_struct.py GenerateReqInput, AbortReq; srt/sampling/sampling_params.py;
srt/managers/tokenizer_manager.py output processing and _wait_one_response;
srt/managers/schedule_batch.py FINISH_*.to_json; srt/metrics/collector.py; docs
basic_usage/native_api):

- GET /health: 200 once ready, 503 while starting or shutting down.
- GET /server_info (/get_server_info before the rename, tried on 404): server args
  plus scheduler info: max_total_num_tokens, max_req_input_len, context_length (null
  unless set), max_running_requests, incremental_streaming_output (older:
  stream_output); internal_states[0] repeats them (+ effective_max_running_requests_per_dp).
- GET /model_info (/get_model_info): model_path.
- POST /generate {"input_ids", "sampling_params": {max_new_tokens, temperature, top_p,
  top_k (-1 disables, 0 is rejected), stop, repetition_penalty, sampling_seed},
  "stream": true, "rid"} -> text/event-stream lines `data: {"text", "output_ids",
  "meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens",
  "cached_tokens"}}` then `data: [DONE]`. text/output_ids are cumulative unless the
  server runs --incremental-streaming-output. finish_reason: null | {"type": "stop",
  "matched"} | {"type": "length", "length"} | {"type": "abort", "message", "status_code"}.
  SGLang's bad-request signal (a ValueError: prompt too long, bad sampling value) comes
  as `data: {"error": {"message"}}` on the 200 stream; body validation fails earlier
  with HTTP 400 {"object": "error", "message", ...}.
- POST /abort_request {"rid"} (some versions match rids by prefix).
- POST /flush_cache: 200, or 400 while requests run; no token count is reported.
- GET /metrics (only with --enable-metrics, else 404): gauges sglang:num_running_reqs,
  num_queue_reqs, num_used_tokens, token_usage, max_total_num_tokens; counters
  sglang:prompt_tokens_total, cached_tokens_total (summed over label sets).
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
from llmfabric.structs import Finish, TokenChunk, Usage, ValidatedRequest

from .config import WorkerConfig
from .engine import EngineInfo, EngineKind, EngineLoad

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # /metrics poll period
POLL_FAILURES_DOWN = 3  # consecutive unreachable polls before load() reports UNAVAILABLE
CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=10.0)  # info, flush and metrics calls
ABORT_TIMEOUT = aiohttp.ClientTimeout(total=2.0)  # fire-and-forget /abort_request
HEALTH_ATTEMPT_SECONDS = 25.0  # older /health runs a one-token generate (up to 20 s)
_SUMMED = {f"sglang:{n}" for n in ("num_running_reqs", "num_queue_reqs", "num_used_tokens", "max_total_num_tokens",
                                   "prompt_tokens_total", "cached_tokens_total")}
_NET_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError)


def _error_text(body: str) -> str:
    """SGLang's message from an error body, whichever of its shapes."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500] or "no details"
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    found = [v for v in (err, *(data.get(k) for k in ("message", "detail"))) if v] if isinstance(data, dict) else []
    return str(found[0] if found else data)[:500]


def _classify(status: object, message: str) -> FabricError:
    """The domain error for an HTTP status or an abort's status_code."""
    if status in (400, 413, 422):
        return InvalidArgument("", message)
    return ResourceExhausted(message) if status == 429 else Unavailable(message)


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _parse_metrics(text: str) -> dict[str, float]:
    """The sglang:* samples used here, summed over label sets (token_usage: the max)."""
    out: dict[str, float] = {}
    for s in (s for family in text_string_to_metric_families(text) for s in family.samples):
        if math.isfinite(s.value) and s.name in _SUMMED:
            out[s.name] = out.get(s.name, 0.0) + s.value
        elif math.isfinite(s.value) and s.name == "sglang:token_usage":
            out[s.name] = max(out.get(s.name, 0.0), s.value)
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
            if isinstance(event, dict):
                yield event


class SGLangEngine:
    """The Engine protocol over one SGLang server (RadixAttention is SGLang's own)."""

    def __init__(self, cfg: WorkerConfig, *, startup_timeout: float | None = None) -> None:
        self.cfg = cfg
        self.url = cfg.sglang_url.rstrip("/")
        self.startup_timeout = cfg.request_timeout if startup_timeout is None else startup_timeout
        self.info = EngineInfo(EngineKind.SGLANG, cfg.model_name or "sglang", cfg.context_length, cfg.capacity)
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task | None = None
        self._aborts: set[asyncio.Task] = set()  # /abort_request calls in flight
        self._active: set[str] = set()  # rids streaming now
        self._incremental = False  # the server streams deltas, not cumulative text/output_ids
        self._max_total = 0  # KV pool size in tokens
        self._metrics: dict[str, float] = {}
        self._poll_failures, self._poll_error = 0, ""
        self._pending = self._streaming = 0  # our requests before / after their first token
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
            return next((v for src in srcs for k in keys if (v := _positive_int(src.get(k)))), None)

        self._max_total = pick("max_total_num_tokens") or 0
        self._incremental = any(src.get(k) is True for src in srcs for k in ("incremental_streaming_output", "stream_output"))
        windows = [self.cfg.context_length, pick("context_length"), (pick("max_req_input_len") or 0) + 1 or None]
        path = str(model.get("model_path") or server.get("served_model_name") or "sglang").rstrip("/")
        self.info = EngineInfo(
            EngineKind.SGLANG,
            self.cfg.model_name or path.rsplit("/", 1)[-1] or path,
            min(w for w in windows if w and w > 1),
            pick("max_running_requests", "effective_max_running_requests_per_dp") or self.cfg.capacity,
        )
        await self._poll_once()
        self._poller = asyncio.create_task(self._poll_loop(), name="sglang-metrics")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for rid in list(self._active):
            self._abort_later(rid)
        if self._aborts:
            await asyncio.wait(set(self._aborts), timeout=ABORT_TIMEOUT.total)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _wait_healthy(self) -> None:
        deadline, last = time.monotonic() + self.startup_timeout, "no answer"
        while True:
            attempt = aiohttp.ClientTimeout(total=max(0.1, min(HEALTH_ATTEMPT_SECONDS, deadline - time.monotonic())))
            try:
                async with self._session.get(self.url + "/health", timeout=attempt) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except _NET_ERRORS as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise Unavailable(f"SGLang at {self.url} did not become healthy within {self.startup_timeout:g}s "
                                  f"(last GET /health: {last})")
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    async def _get_json(self, path: str, legacy: str) -> dict:
        for p in (path, legacy):
            try:
                async with self._session.get(self.url + p, timeout=CONTROL_TIMEOUT) as resp:
                    body = await resp.text()
                if resp.status == 404 and p == path:
                    continue  # a server from before the /get_* -> /* rename
                if resp.status != 200:
                    raise Unavailable(f"SGLang GET {p}: HTTP {resp.status}: {_error_text(body)}")
                if not isinstance(data := json.loads(body), dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                return data
            except (*_NET_ERRORS, ValueError) as exc:
                raise Unavailable(f"SGLang GET {p} at {self.url} failed: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def generate(self, request: ValidatedRequest) -> AsyncIterator[TokenChunk]:
        if self._session is None:
            raise Unavailable("SGLang engine is not started")
        s = request.sampling
        params = {"max_new_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                  "top_k": s.top_k if s.top_k > 0 else -1, "stop": list(s.stop),
                  "repetition_penalty": s.repetition_penalty}
        if s.seed is not None:
            params["sampling_seed"] = s.seed
        rid = request.request_id or uuid.uuid4().hex
        body = {"input_ids": list(request.prompt_token_ids), "sampling_params": params, "stream": True, "rid": rid}
        done, first = False, True  # done: nothing of ours left running upstream; first: no token yet
        text, n_ids, final = "", 0, None
        self._pending += 1
        self._active.add(rid)
        try:
            try:
                timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout)
                async with self._session.post(self.url + "/generate", json=body, timeout=timeout) as resp:
                    if resp.status != 200:
                        done = True
                        msg = f"SGLang /generate answered HTTP {resp.status}: {_error_text(await resp.text())}"
                        raise _classify(resp.status, msg)
                    async for event in _sse(resp):
                        if event is None:
                            break
                        if final is not None:
                            continue  # read on to [DONE] so the connection is reused
                        if "error" in event:
                            done = True
                            raise InvalidArgument("", f"SGLang rejected the request: {_error_text(json.dumps(event))}")
                        delta, new = "", event.get("text")
                        if isinstance(new, str) and self._incremental:
                            delta = new
                        elif isinstance(new, str):  # cumulative; a trimmed stop string may shorten it
                            delta, text = (new[len(text):] if new.startswith(text) else ""), new
                        ids = event.get("output_ids") if isinstance(event.get("output_ids"), list) else []
                        if not self._incremental:
                            ids, n_ids = ids[n_ids:], max(n_ids, len(ids))
                        else:
                            n_ids += len(ids)
                        meta = event.get("meta_info") or {}
                        reason = meta.get("finish_reason")
                        if isinstance(reason, dict) and reason.get("type") == "abort":
                            done = True
                            raise _classify(reason.get("status_code"), "SGLang aborted the request: "
                                            f"{reason.get('message') or 'no reason given'}")
                        if reason:
                            done = True
                            kind = reason.get("type") if isinstance(reason, dict) else reason
                            usage = Usage(int(meta.get("prompt_tokens") or len(body["input_ids"])),
                                          int(meta.get("completion_tokens") or n_ids), int(meta.get("cached_tokens") or 0))
                            final = TokenChunk(tuple(ids), delta, Finish.LENGTH if kind == "length" else Finish.STOP, usage)
                        elif delta or ids:
                            if first:
                                first, self._pending, self._streaming = False, self._pending - 1, self._streaming + 1
                            yield TokenChunk(tuple(ids), delta)
            except asyncio.TimeoutError as exc:
                if final is None:
                    raise DeadlineExceeded(f"SGLang did not finish within {self.cfg.request_timeout:g}s") from exc
            except _NET_ERRORS as exc:
                if final is None:
                    where = "before the first token" if first else "mid-stream"
                    raise Unavailable(f"SGLang connection failed {where}: {type(exc).__name__}: {exc}") from exc
            if final is None:
                raise Unavailable("SGLang stream ended without a finish_reason")
            self._prompt_total += final.usage.prompt_tokens
            self._cached_total += final.usage.cached_tokens
            yield final
        finally:
            if first:
                self._pending -= 1
            else:
                self._streaming -= 1
            self._active.discard(rid)
            if not done:  # cancelled, timed out or cut off: free SGLang's slot
                self._abort_later(rid)

    def _abort_later(self, rid: str) -> None:
        if self._session is not None and not self._session.closed:
            task = asyncio.get_running_loop().create_task(self._abort(rid))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

    async def _abort(self, rid: str) -> None:
        try:
            async with self._session.post(self.url + "/abort_request", json={"rid": rid}, timeout=ABORT_TIMEOUT) as r:
                if r.status != 200:
                    log.warning("SGLang /abort_request answered HTTP %s", r.status, extra={"request": rid})
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("SGLang /abort_request failed: %r", exc, extra={"request": rid})

    def load(self) -> EngineLoad:
        if self._poll_failures >= POLL_FAILURES_DOWN:
            raise Unavailable(f"SGLang at {self.url} is unreachable: {self._poll_error}")
        m = self._metrics
        total = int(m.get("sglang:max_total_num_tokens") or self._max_total)
        used = m.get("sglang:num_used_tokens", m.get("sglang:token_usage", 0.0) * total)
        used = min(int(round(used)), total) if total else int(used)
        return EngineLoad(
            running=max(int(m.get("sglang:num_running_reqs", 0)), self._streaming),
            waiting=max(int(m.get("sglang:num_queue_reqs", 0)), self._pending),
            capacity=self.info.capacity,
            kv_used=used,
            kv_free=max(0, total - used),
            prompt_tokens_total=int(m.get("sglang:prompt_tokens_total", self._prompt_total)),
            cached_tokens_total=int(m.get("sglang:cached_tokens_total", self._cached_total)),
            evictions_total=0,  # SGLang exports no prefix-cache eviction counter
        )

    async def flush_cache(self) -> int:
        if self._session is None:
            raise Unavailable("SGLang engine is not started")
        try:
            async with self._session.post(self.url + "/flush_cache", timeout=CONTROL_TIMEOUT) as resp:
                body = await resp.text()
        except _NET_ERRORS as exc:
            raise Unavailable(f"SGLang /flush_cache failed: {exc!r}") from exc
        if resp.status != 200:
            raise Unavailable(f"SGLang refused /flush_cache (HTTP {resp.status}): {_error_text(body)}")
        return 0  # SGLang does not say how many tokens it dropped

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            await self._poll_once()

    async def _poll_once(self) -> None:
        try:
            async with self._session.get(self.url + "/metrics", timeout=CONTROL_TIMEOUT) as resp:
                body = await resp.text()
        except _NET_ERRORS as exc:
            self._poll_failures += 1
            self._poll_error = f"GET /metrics: {type(exc).__name__}: {exc}"
            return
        self._poll_failures = 0
        try:
            self._metrics = _parse_metrics(body) if resp.status == 200 else {}  # 404: no --enable-metrics
        except ValueError as exc:
            log.warning("unreadable SGLang /metrics: %r", exc)

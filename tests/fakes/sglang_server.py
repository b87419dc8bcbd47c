"""An in-process stand-in for an SGLang server's native HTTP API (tests only).

It follows the protocol of sgl-project/sglang's ``srt/entrypoints/http_server.py``
and tokenizer manager: the same endpoints and field names, ``text`` and
``output_ids`` cumulative in every ``data:`` line (deltas with
``incremental=True``, like ``--incremental-streaming-output``), ``meta_info``
with ``id``, ``finish_reason`` (null, ``{"type": "stop", "matched"}``,
``{"type": "length", "length"}``, ``{"type": "abort", "message",
"status_code", "err_type"}``), ``prompt_tokens``, ``completion_tokens``,
``cached_tokens``; ``data: [DONE]`` at the end. Errors take SGLang's shapes:
body validation -> HTTP 400 ``{"object": "error", "message", "type", "param",
"code"}``; a ValueError while streaming (prompt too long, bad sampling value)
-> ``data: {"error": {"message"}}`` on the 200 stream; HTTPException ->
``{"object": "error", ...}`` with its status.

Generation is deterministic: output token ``i`` of a prompt is
``token_at(prompt, i)`` and renders as ``" " + WORDS[id % len(WORDS)]`` (some
words are multi-byte), so tests compute the expected answer with
``expected(...)``. A prefix cache remembers every sequence it served:
``cached_tokens`` is the longest shared prefix (at most ``len(prompt) - 1``,
as SGLang always computes the last prompt token).

Failure modes (``fail``), each after ``fail_after`` streamed tokens where it
applies: ``http_400`` / ``http_429`` / ``http_500`` / ``http_503`` (before
streaming), ``error_line`` (a ValueError line), ``abort_503`` (the scheduler
aborts with status 503, as on a request timeout), ``close`` (connection cut
mid-stream), ``drop`` (connection cut before any answer), ``no_finish``
(``[DONE]`` without a finish_reason). ``token_delay`` slows tokens;
``hold`` (an Event) pauses after the first token until set; ``write_size``
sends every line in tiny pieces; ``pad_bytes`` makes lines huge.
"""

from __future__ import annotations

import asyncio
import json
import os

from aiohttp import web

WORDS = ("alpha", "beta", "gamma", "delta", "café", "naïve", "über", "日本", "🙂", "zeta", "eta", "theta", "iota",
         "kappa", "lambda", "mu")
VOCAB = 997
FAILURES = ("http_400", "http_429", "http_500", "http_503", "error_line", "abort_503", "close", "drop", "no_finish")
SAMPLING_KEYS = {"max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
                 "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "ignore_eos",
                 "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "sampling_seed", "json_schema",
                 "regex", "ebnf", "logit_bias", "custom_params", "stream_interval", "stop_regex", "structural_tag"}


def token_at(prompt: list[int] | tuple[int, ...], i: int) -> int:
    """The ``i``-th generated token id for ``prompt``."""
    return (sum(prompt) * 31 + len(prompt) * 7 + 13 * i) % VOCAB


def render(token: int) -> str:
    return " " + WORDS[token % len(WORDS)]


def expected(prompt, max_new_tokens: int, stop: tuple[str, ...] = (), eos: int | None = None):
    """(text, output_ids, finish_reason) the stand-in produces for a request."""
    text, ids = "", []
    for i in range(max_new_tokens):
        tok = token_at(prompt, i)
        ids.append(tok)
        if tok == eos:
            return text, ids, {"type": "stop", "matched": eos}
        text += render(tok)
        hits = [(text.find(s), s) for s in stop if s in text]
        if hits:
            at, s = min(hits)
            return text[:at], ids, {"type": "stop", "matched": s}
    return text, ids, {"type": "length", "length": max_new_tokens}


def _error_response(status: int, message: str, type_: str | None = None) -> web.Response:
    """FastAPI's ErrorResponse as SGLang's exception handlers return it."""
    body = {"object": "error", "message": message, "type": type_ or str(status), "param": None, "code": status}
    return web.json_response(body, status=status)


class FakeSGLang:
    """An SGLang server on 127.0.0.1:<random port>; ``await start()``, ``await close()``."""

    def __init__(self, *, model_path: str = "fake-org/Fake-Model-7B-Instruct", legacy: bool = False,
                 incremental: bool = False, context_length: int | None = None, model_context: int = 4096,
                 max_total_num_tokens: int = 8192, max_running_requests: int | None = 16,
                 metrics_enabled: bool = True) -> None:
        self.model_path = model_path
        self.legacy = legacy  # serve /get_server_info and /get_model_info only (servers before the rename)
        self.incremental = incremental
        self.context_length = context_length  # --context-length (None: the model's own)
        self.model_context = model_context
        self.max_total_num_tokens = max_total_num_tokens
        self.max_running_requests = max_running_requests
        self.metrics_enabled = metrics_enabled
        self.metrics_override: dict[str, float] = {}  # sample name -> value, replaces the live value
        self.healthy = True
        self.flush_ok = True
        self.eos_token_id: int | None = None
        self.fail: str | None = None
        self.fail_after = 1
        self.token_delay = 0.0
        self.hold: asyncio.Event | None = None
        self.write_size = 0  # > 0: send each line in pieces this small (cuts through UTF-8 sequences)
        self.pad_bytes = 0  # > 0: an extra meta_info field this long (lines beyond client buffer sizes)
        # records
        self.requests: list[dict] = []  # /generate bodies
        self.aborted: list[str] = []  # rids given to /abort_request
        self.disconnected: list[str] = []  # rids whose client went away mid-stream
        self.finished: list[str] = []
        self.flushes = 0
        self.health_checks = 0
        self._cache: list[tuple[int, ...]] = []  # sequences served (the "radix tree")
        self._active: dict[str, int] = {}  # rid -> tokens in use
        self._abort_flags: set[str] = set()
        self.prompt_tokens_total = self.cached_tokens_total = self.generation_tokens_total = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/health_generate", self._health)
        info_prefix = "/get_" if self.legacy else "/"
        app.router.add_get(f"{info_prefix}server_info", self._server_info)
        app.router.add_get(f"{info_prefix}model_info", self._model_info)
        app.router.add_route("POST", "/generate", self._generate)
        app.router.add_route("PUT", "/generate", self._generate)
        app.router.add_route("POST", "/abort_request", self._abort_request)
        app.router.add_route("*", "/flush_cache", self._flush_cache)
        if self.metrics_enabled:
            app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ info endpoints

    def _window(self) -> int:
        return self.context_length or self.model_context

    def _server_args(self) -> dict:
        args = {
            "model_path": self.model_path, "tokenizer_path": self.model_path, "context_length": self.context_length,
            "skip_tokenizer_init": False, "is_embedding": False, "max_running_requests": self.max_running_requests,
            "max_queued_requests": None, "max_total_tokens": None, "chunked_prefill_size": 8192, "page_size": 1,
            "schedule_policy": "fcfs", "stream_interval": 1, "served_model_name": self.model_path, "dp_size": 1,
            "tp_size": 1, "enable_metrics": self.metrics_enabled, "disable_radix_cache": False,
            "weight_version": "default", "device": "cuda",
        }
        args["stream_output" if self.legacy else "incremental_streaming_output"] = self.incremental
        return args

    async def _server_info(self, request: web.Request) -> web.Response:
        state = {**self._server_args(), "last_gen_throughput": 0.0,
                 "memory_usage": {"weight": 1.0, "kvcache": 0.5, "token_capacity": self.max_total_num_tokens}}
        if not self.legacy:
            state["effective_max_running_requests_per_dp"] = self.max_running_requests or 48
        return web.json_response({
            **self._server_args(), "status": "ready", "max_total_num_tokens": self.max_total_num_tokens,
            "max_req_input_len": min(self._window(), self.max_total_num_tokens) - 1,
            "internal_states": [state], "version": "0.4.3" if self.legacy else "0.5.9",
        })

    async def _model_info(self, request: web.Request) -> web.Response:
        info = {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": "default"}
        if not self.legacy:
            info.update(has_image_understanding=False, has_audio_understanding=False, model_type="llama",
                        architectures=["LlamaForCausalLM"])
        return web.json_response(info)

    async def _health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        return web.Response(status=200 if self.healthy else 503)

    async def _flush_cache(self, request: web.Request) -> web.Response:
        if not self.flush_ok or self._active:
            return web.Response(status=400, text="Flush cache failed: there are running or waiting requests.\n")
        self.flushes += 1
        self._cache.clear()
        return web.Response(text="Cache flushed.\nPlease check backend logs for more details. (When there are "
                                 "running or waiting requests, the operation will not be performed.)\n")

    async def _abort_request(self, request: web.Request) -> web.Response:
        body = await request.json()
        rid = body.get("rid", "")
        self.aborted.append(rid)
        for active in self._active:
            if body.get("abort_all") or active == rid:
                self._abort_flags.add(active)
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        used = sum(self._active.values())
        cap = self.max_running_requests or 48
        values = {
            "sglang:num_running_reqs": min(len(self._active), cap),
            "sglang:num_queue_reqs": max(0, len(self._active) - cap),
            "sglang:num_used_tokens": used,
            "sglang:token_usage": round(used / self.max_total_num_tokens, 2),
            "sglang:cache_hit_rate": self.cached_tokens_total / max(1, self.prompt_tokens_total),
            "sglang:gen_throughput": 0.0,
            "sglang:max_total_num_tokens": self.max_total_num_tokens,
            "sglang:prompt_tokens_total": self.prompt_tokens_total,
            "sglang:generation_tokens_total": self.generation_tokens_total,
            "sglang:cached_tokens_total": self.cached_tokens_total,
        }
        values.update(self.metrics_override)
        labels = f'model_name="{self.model_path}"'
        lines = []
        for name, value in values.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            family = name[: -len("_total")] if kind == "counter" else name
            extra = ',cache_source="device"' if name == "sglang:cached_tokens_total" else ""
            lines += [f"# HELP {family} {family}", f"# TYPE {family} {kind}",
                      f"{name}{{{labels}{extra}}} {float(value)}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")

    # ------------------------------------------------------------------ generation

    def _bad_body(self, body: object) -> str | None:
        """Pydantic-like validation of GenerateReqInput (SGLang answers 400)."""
        if not isinstance(body, dict):
            return "Input should be a valid dictionary"
        ids = body.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            return "Either text, input_ids or input_embeds should be provided."
        params = body.get("sampling_params", {})
        if not isinstance(params, dict):
            return "sampling_params: Input should be a valid dictionary"
        unknown = set(params) - SAMPLING_KEYS
        if unknown:
            return f"sampling_params: unexpected keyword argument(s) {sorted(unknown)}"
        return None

    def _value_error(self, ids: list[int], p: dict) -> str | None:
        """SGLang's ValueErrors (SamplingParams.verify, input length checks)."""
        temperature, top_p, top_k = p.get("temperature", 1.0), p.get("top_p", 1.0), p.get("top_k", -1)
        max_new = p.get("max_new_tokens", 128)
        if temperature < 0:
            return f"temperature must be a non-negative finite number, got {temperature}."
        if not 0.0 < top_p <= 1.0:
            return f"top_p must be in (0, 1], got {top_p}."
        if top_k < 1 and top_k != -1:
            return f"top_k must be -1 (disable) or at least 1, got {top_k}."
        if not 0.0 < p.get("repetition_penalty", 1.0) <= 2.0:
            return f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {p['repetition_penalty']}."
        if max_new < 0:
            return f"max_new_tokens must be at least 0, got {max_new}."
        window = self._window()
        if len(ids) >= window:
            return f"The input ({len(ids)} tokens) is longer than the model's context length ({window} tokens)."
        if len(ids) + max_new > window:
            return (f"Requested token count exceeds the model's maximum context length of {window} tokens. You "
                    f"requested a total of {len(ids) + max_new} tokens: {len(ids)} tokens from the input messages "
                    f"and {max_new} tokens for the completion. Please reduce the number of tokens in the input "
                    "messages or the completion to fit within the limit.")
        return None

    def _match_prefix(self, ids: list[int]) -> int:
        best = 0
        for seq in self._cache:
            n = 0
            for a, b in zip(seq, ids):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, len(ids) - 1)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error_response(400, "JSON decode error", "Bad Request")
        if problem := self._bad_body(body):
            return _error_response(400, problem, "Bad Request")
        self.requests.append(body)
        if self.fail and self.fail.startswith("http_"):
            status = int(self.fail[5:])
            if status == 500:  # an unhandled exception: Starlette's plain-text 500
                return web.Response(status=500, text="Internal Server Error")
            return _error_response(status, f"fake SGLang failure (HTTP {status})")
        if self.fail == "drop":  # cut the connection before any answer
            request.transport.close()
            return web.Response()
        ids: list[int] = body["input_ids"]
        params: dict = body.get("sampling_params") or {}
        rid = body.get("rid") or os.urandom(16).hex()
        if not body.get("stream"):
            return await self._generate_whole(rid, ids, params)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj) -> None:  # raw UTF-8 like SGLang's orjson, not \u escapes
            data = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()
            data = b"data: " + data + b"\n\n"
            step = self.write_size or len(data)
            for at in range(0, len(data), step):
                await resp.write(data[at: at + step])

        problem = self._value_error(ids, params)
        if rid in self._active:
            problem = f"Duplicate request ID detected: {rid}"
        if problem or self.fail == "error_line":
            await send({"error": {"message": problem or "fake SGLang failure (ValueError)"}})
            await send(b"[DONE]")
            return resp
        self._active[rid] = len(ids)
        try:
            async for out in self._decode(rid, ids, params):
                if out == "close":
                    request.transport.close()
                    return resp
                await send(out)
            await send(b"[DONE]")
        except ConnectionError:  # the client went away; SGLang aborts the request then
            self.disconnected.append(rid)
        except asyncio.CancelledError:
            self.disconnected.append(rid)
            raise
        finally:
            self._active.pop(rid, None)
            self._abort_flags.discard(rid)
        return resp

    async def _generate_whole(self, rid: str, ids: list[int], params: dict) -> web.Response:
        if problem := self._value_error(ids, params):
            return web.json_response({"error": {"message": problem}}, status=400)
        self._active[rid] = len(ids)
        try:
            last = None
            async for out in self._decode(rid, ids, params):
                last = out
        finally:
            self._active.pop(rid, None)
        if not isinstance(last, dict):
            return _error_response(500, "fake SGLang failure")
        status = (last["meta_info"]["finish_reason"] or {}).get("status_code")
        if status:
            return _error_response(status, last["meta_info"]["finish_reason"]["message"])
        return web.json_response(last)

    async def _decode(self, rid: str, ids: list[int], params: dict):
        """One output dict per token (the last carries finish_reason), or "close"."""
        max_new = params.get("max_new_tokens", 128)
        stop = params.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        cached = self._match_prefix(ids)
        self.prompt_tokens_total += len(ids)
        self.cached_tokens_total += cached
        text_all, out_ids = "", []
        sent_text, sent_ids = "", 0
        meta = {"id": rid, "finish_reason": None, "prompt_tokens": len(ids), "weight_version": "default",
                "total_retractions": 0, "completion_tokens": 0, "cached_tokens": cached}
        for i in range(max_new):
            if rid in self._abort_flags:
                meta.update(finish_reason={"type": "abort", "message": "Abort in waiting queue" if not out_ids else
                                           "Aborted", "status_code": None, "err_type": None})
                yield self._out(text_all, out_ids, meta, sent_text, sent_ids)
                return
            if i == self.fail_after and self.fail in ("abort_503", "close", "no_finish"):
                if self.fail == "close":
                    yield "close"
                    return
                if self.fail == "abort_503":
                    meta.update(finish_reason={"type": "abort", "message": "Request running timeout reached.",
                                               "status_code": 503, "err_type": None})
                    yield self._out(text_all, out_ids, meta, sent_text, sent_ids)
                return  # no_finish: [DONE] without a finish_reason
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            text_all, out_ids, finish = self._step(ids, out_ids, text_all, max_new, stop)
            self._active[rid] = len(ids) + len(out_ids)
            self.generation_tokens_total += 1
            meta.update(completion_tokens=len(out_ids), finish_reason=finish)
            if finish is not None:
                meta["e2e_latency"] = 0.01
                self._cache.append(tuple(ids) + tuple(out_ids))
                self.finished.append(rid)
            yield self._out(text_all, out_ids, meta, sent_text, sent_ids)
            sent_text, sent_ids = text_all, len(out_ids)
            if finish is not None:
                return
            while i == 0 and self.hold is not None and not self.hold.is_set() and rid not in self._abort_flags:
                await asyncio.sleep(0.01)

    def _step(self, ids, out_ids, text, max_new, stop):
        tok = token_at(ids, len(out_ids))
        out_ids = out_ids + [tok]
        if tok == self.eos_token_id:
            return text, out_ids, {"type": "stop", "matched": tok}
        text += render(tok)
        hits = [(text.find(s), s) for s in stop if s in text]
        if hits:
            at, s = min(hits)
            return text[:at], out_ids, {"type": "stop", "matched": s}
        if len(out_ids) >= max_new:
            return text, out_ids, {"type": "length", "length": max_new}
        return text, out_ids, None

    def _out(self, text: str, out_ids: list[int], meta: dict, sent_text: str, sent_ids: int) -> dict:
        meta = {**meta, "padding": "x" * self.pad_bytes} if self.pad_bytes else dict(meta)
        if self.incremental:
            return {"text": text[len(sent_text):], "output_ids": out_ids[sent_ids:], "meta_info": meta}
        return {"text": text, "output_ids": list(out_ids), "meta_info": meta}

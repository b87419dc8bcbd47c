"""The OpenAI-compatible HTTP API (aiohttp): /v1/chat/completions,
/v1/completions, /v1/models, plus /healthz.

``stream: true`` answers with SSE ``data:`` chunks ending in
``data: [DONE]``; ``stream: false`` with one JSON body carrying ``usage``.
Errors use OpenAI's ``{"error": {message, type, param, code}}`` shape with
the matching HTTP status. A client that disconnects cancels the handler,
which cancels the request all the way to the worker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import grpc
from aiohttp import web

from llmfabric.runtime.context import REQUEST_ID_HEADER, new_request_id, request_id_var
from llmfabric.runtime.errors import FabricError, InvalidArgument
from llmfabric.structs import TokenChunk

from .answer_cache import CONTROL_HEADER, THRESHOLD_HEADER, CacheControl
from .headers import PRIORITY_HEADER, TENANT_HEADER, priority_from_header
from .openai_request import OpenAIRequest, parse_chat, parse_completion
from .pipeline import Answer, Pipeline, collect

log = logging.getLogger(__name__)

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", "cancelled"),
}


def error_body(err: FabricError) -> tuple[int, dict]:
    """HTTP status and OpenAI error JSON for a domain error."""
    status, kind, code = _STATUS.get(err.code, (500, "server_error", "internal_error"))
    param = err.field.removeprefix("sampling.") or None
    message = err.message.replace("sampling.", "") if param else err.message
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: FabricError) -> web.Response:
    status, body = error_body(err)
    headers = {"Retry-After": str(max(1, round(err.retry_after_ms / 1000)))} if err.retry_after_ms else None
    return web.json_response(body, status=status, headers=headers)


def _finish(chunk: TokenChunk) -> str | None:
    return chunk.finish.value if chunk.finish is not None else None


def _usage(chunk: TokenChunk) -> dict | None:
    u = chunk.usage
    if u is None:
        return None
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


class OpenAIApi:
    """Routes and handlers bound to one pipeline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.pipeline.models else "loading"})

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m.name, "object": "model", "created": m.created, "owned_by": "llmfabric",
                 "max_model_len": m.context_length} for m in self.pipeline.models]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, parse_chat, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, parse_completion, chat=False)

    async def _serve(self, request: web.Request, parse: Callable[..., OpenAIRequest], chat: bool) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
        request_id_var.set(rid)
        try:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as exc:
                raise InvalidArgument("body", f"is not valid JSON: {exc}") from None
            parsed = parse(
                body, rid, tenant_id=request.headers.get(TENANT_HEADER, ""),
                priority=priority_from_header(request.headers.get(PRIORITY_HEADER)),
                cache=CacheControl.parse(request.headers.get(CONTROL_HEADER), request.headers.get(THRESHOLD_HEADER)),
            )
            answer = await self.pipeline.start(parsed.input)
            if parsed.stream:
                return await self._stream(request, parsed, chat, answer)
            text, last = await collect(answer.chunks)
        except FabricError as err:
            log.info("request rejected", extra={"code": err.code.name, "reason": err.message})
            return error_response(err)
        except Exception:  # noqa: BLE001 - never a bare 500 page: an OpenAI error body
            log.exception("unhandled error in the OpenAI API")
            return error_response(FabricError(f"internal error; see server logs (request id {rid})"))
        created = int(time.time())
        choice: dict = {"index": 0, "finish_reason": _finish(last), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response(
            {
                "id": ("chatcmpl-" if chat else "cmpl-") + rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": self._model_name(),
                "choices": [choice],
                "usage": _usage(last),
            },
            headers={REQUEST_ID_HEADER: rid, **answer.cache.headers()},
        )

    async def _stream(self, request: web.Request, parsed: OpenAIRequest, chat: bool, answer: Answer) -> web.StreamResponse:
        chunks = answer.chunks
        # Validate before committing to a 200: the first chunk (or error) decides.
        first = await anext(chunks, None)
        if first is None:
            raise FabricError("the answer stream ended before it started")
        rid = parsed.input.request_id
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                REQUEST_ID_HEADER: rid,
                **answer.cache.headers(),
            }
        )
        await resp.prepare(request)
        base = {
            "id": ("chatcmpl-" if chat else "cmpl-") + rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self._model_name(),
        }

        async def send(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
            await resp.write(f"data: {data}\n\n".encode())

        def choice(text: str, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        last = first
        try:
            if chat:
                await send({**base, "choices": [choice("", None, role=True)]})
            chunk: TokenChunk | None = first
            while chunk is not None:
                last = chunk
                if chunk.text or chunk.finish is not None:
                    extra = {"usage": None} if parsed.include_usage else {}
                    await send({**base, "choices": [choice(chunk.text, _finish(chunk))], **extra})
                chunk = await anext(chunks, None)
            if parsed.include_usage:
                await send({**base, "choices": [], "usage": _usage(last)})
        except FabricError as err:
            _, body = error_body(err)
            await send(body)
        finally:
            await chunks.aclose()  # a disconnect cancels us mid-write: stop the generation now
        await send("[DONE]")
        await resp.write_eof()
        return resp

    def _model_name(self) -> str:
        return self.pipeline.models[0].name if self.pipeline.models else ""

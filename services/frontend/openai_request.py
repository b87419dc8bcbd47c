"""Parse OpenAI-style JSON bodies into a GenerationInput.

Every rejection is an ``InvalidArgument`` naming the JSON field, so the
client sees ``{"error": {"param": "temperature", ...}}`` with HTTP 400.
Accepted and honoured: model, messages / prompt, max_tokens
(max_completion_tokens), temperature, top_p, stop, seed, stream,
stream_options.include_usage, n=1, user; vLLM's top_k and
repetition_penalty. Accepted and ignored (documented): presence_penalty,
frequency_penalty, logit_bias={} and other fields clients send by default.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import InvalidArgument

from .answer_cache import CacheControl
from .pipeline import GenerationInput


@dataclasses.dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """A parsed chat or completion request."""

    input: GenerationInput  # what the pipeline runs
    stream: bool  # SSE or one JSON body
    include_usage: bool  # stream_options.include_usage


def _number(body: dict, key: str, *, integer: bool = False) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(key, f"must be a number, got {type(value).__name__}")
    if integer and isinstance(value, int):
        return value  # arbitrary size: the callers check ranges
    try:
        number = float(value)
    except OverflowError:
        raise InvalidArgument(key, "is out of range") from None
    if not math.isfinite(number):
        raise InvalidArgument(key, "must be finite")
    if integer and not number.is_integer():
        raise InvalidArgument(key, f"must be an integer, got {value}")
    return int(number) if integer else number


def _text(field: str, value: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"), which are not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(field, "is not valid UTF-8 (lone surrogate)") from None
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [_text("stop", stop)]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [_text(f"stop[{i}]", s) for i, s in enumerate(stop)]
    raise InvalidArgument("stop", "must be a string or a list of strings")


def _sampling(body: dict) -> common_pb2.SamplingParams:
    sp = common_pb2.SamplingParams(stop=_stop(body))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, integer=True)
    if max_tokens is not None:
        if not -(2**31) <= max_tokens < 2**31:
            raise InvalidArgument(key, f"is out of range: {max_tokens}")
        sp.max_tokens = max_tokens
    for key in ("temperature", "top_p", "repetition_penalty"):
        value = _number(body, key)
        if value is not None:
            setattr(sp, key, value)
    top_k = _number(body, "top_k", integer=True)
    if top_k is not None:
        if top_k == -1:  # vLLM's "disabled"
            top_k = 0
        if not 0 <= top_k < 2**31:
            raise InvalidArgument("top_k", f"must be -1 (disabled) or a non-negative integer, got {top_k}")
        sp.top_k = top_k
    seed = _number(body, "seed", integer=True)
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise InvalidArgument("seed", "must be a non-negative 64-bit integer")
        sp.seed = seed
    return sp


def _common_checks(body: dict) -> tuple[bool, bool]:
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidArgument("n", "only n=1 is supported")
    if body.get("logprobs") not in (None, False, 0):
        raise InvalidArgument("logprobs", "logprobs are not supported")
    if body.get("top_logprobs") not in (None, 0):
        raise InvalidArgument("top_logprobs", "logprobs are not supported")
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise InvalidArgument("stream", "must be a boolean")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise InvalidArgument("stream_options", "must be an object")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidArgument("model", "must be a string")
    _text("model", model)
    return stream, bool(opts.get("include_usage", False))


def _content(i: int, content: Any) -> str:
    """Message content: a string or a list of text parts."""
    if isinstance(content, str):
        return _text(f"messages[{i}].content", content)
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(f"messages[{i}].content[{j}]", "only text parts are supported")
            parts.append(_text(f"messages[{i}].content[{j}].text", part["text"]))
        return "".join(parts)
    raise InvalidArgument(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_chat(body: Any, request_id: str, tenant_id: str = "", priority: int = 0, cache: CacheControl = CacheControl()) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    stream, include_usage = _common_checks(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list of {role, content} objects")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for system
            role = "system"
        if not isinstance(role, str):
            raise InvalidArgument(f"messages[{i}].role", "must be a string")
        pairs.append((role, _content(i, m.get("content"))))
    inp = GenerationInput(
        request_id=request_id, model=body.get("model") or "", prompt=None, messages=tuple(pairs),
        sampling=_sampling(body), tenant_id=tenant_id, priority=priority, cache=cache,
    )
    return OpenAIRequest(inp, stream, include_usage)


def parse_completion(
    body: Any, request_id: str, tenant_id: str = "", priority: int = 0, cache: CacheControl = CacheControl()
) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    stream, include_usage = _common_checks(body)
    if body.get("echo"):
        raise InvalidArgument("echo", "echo is not supported")
    if body.get("suffix"):
        raise InvalidArgument("suffix", "suffix is not supported")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt", "must be a string (or a list holding one string)")
    _text("prompt", prompt)
    inp = GenerationInput(
        request_id=request_id, model=body.get("model") or "", prompt=prompt, messages=None,
        sampling=_sampling(body), tenant_id=tenant_id, priority=priority, cache=cache,
    )
    return OpenAIRequest(inp, stream, include_usage)

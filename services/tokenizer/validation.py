"""Request validation: every rejection names the field it is about.

Pure functions over plain values; the servicer turns ``InvalidArgument``
into INVALID_ARGUMENT (HTTP 400 at the edge).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from llmfabric.models.chat_template import ROLES
from llmfabric.runtime.errors import InvalidArgument
from llmfabric.structs import Sampling


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a request must respect."""

    context_length: int  # prompt + max_tokens must fit
    max_request_bytes: int = 1 << 20  # UTF-8 bytes of prompt or all messages
    max_messages: int = 512  # messages per conversation
    max_stop_sequences: int = 4  # like OpenAI
    max_stop_chars: int = 64  # per stop sequence
    default_max_tokens: int = 256  # when the client sends none (capped by the window)
    default_temperature: float = 0.7
    default_top_p: float = 1.0


def check_text(field: str, text: str, limits: Limits, allow_empty: bool = False) -> int:
    """Non-empty, valid UTF-8 (no lone surrogates) text; returns its byte size."""
    if not isinstance(text, str):
        raise InvalidArgument(field, "must be a string")
    if not text and not allow_empty:
        raise InvalidArgument(field, "must not be empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(field, "is not valid UTF-8 (lone surrogate)") from None
    if size > limits.max_request_bytes:
        raise InvalidArgument(field, f"is {size} bytes; the limit is {limits.max_request_bytes}")
    return size


def check_messages(messages: Sequence[tuple[str, str]], limits: Limits) -> list[tuple[str, str]]:
    """A non-empty conversation of known roles within the size limit."""
    if not messages:
        raise InvalidArgument("messages", "must contain at least one message")
    if len(messages) > limits.max_messages:
        raise InvalidArgument("messages", f"has {len(messages)} messages; the limit is {limits.max_messages}")
    total = 0
    out = []
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        total += check_text(f"messages[{i}].content", content, limits, allow_empty=(role == "assistant"))
        out.append((role, content))
    if total > limits.max_request_bytes:
        raise InvalidArgument("messages", f"total {total} bytes; the limit is {limits.max_request_bytes}")
    if messages[-1][0] == "assistant" and not messages[-1][1]:
        raise InvalidArgument(f"messages[{len(messages) - 1}].content", "must not be empty")
    return out


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, "must be a finite number")
    return value


def resolve_sampling(
    *,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    max_tokens: int | None,
    stop: Sequence[str],
    seed: int | None,
    repetition_penalty: float | None,
    prompt_tokens: int,
    limits: Limits,
    vocab_size: int,
    prefix: str = "sampling.",
    input_field: str = "prompt",
) -> Sampling:
    """Check ranges, fill defaults and fit max_tokens into the context."""
    if temperature is not None and not 0.0 <= _finite(prefix + "temperature", temperature) <= 2.0:
        raise InvalidArgument(prefix + "temperature", f"must be between 0 and 2, got {temperature:g}")
    if top_p is not None and not 0.0 < _finite(prefix + "top_p", top_p) <= 1.0:
        raise InvalidArgument(prefix + "top_p", f"must be in (0, 1], got {top_p:g}")
    if top_k is not None and not 0 <= top_k <= vocab_size:
        raise InvalidArgument(prefix + "top_k", f"must be between 0 and {vocab_size}, got {top_k}")
    if repetition_penalty is not None and not 0.0 < _finite(prefix + "repetition_penalty", repetition_penalty) <= 2.0:
        raise InvalidArgument(prefix + "repetition_penalty", f"must be in (0, 2], got {repetition_penalty:g}")
    if len(stop) > limits.max_stop_sequences:
        raise InvalidArgument(prefix + "stop", f"at most {limits.max_stop_sequences} stop sequences, got {len(stop)}")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidArgument(f"{prefix}stop[{i}]", "must not be empty")
        if len(s) > limits.max_stop_chars:
            raise InvalidArgument(f"{prefix}stop[{i}]", f"is longer than {limits.max_stop_chars} characters")
        check_text(f"{prefix}stop[{i}]", s, limits)
    room = limits.context_length - prompt_tokens
    if room < 1:
        raise InvalidArgument(
            input_field,
            f"is {prompt_tokens} tokens; the model's context window is {limits.context_length} tokens "
            "and at least one must remain for the answer",
        )
    if max_tokens is not None:
        if max_tokens < 1:
            raise InvalidArgument(prefix + "max_tokens", f"must be at least 1, got {max_tokens}")
        if max_tokens > room:
            raise InvalidArgument(
                prefix + "max_tokens",
                f"{prompt_tokens} prompt tokens + {max_tokens} max_tokens exceeds the context window of "
                f"{limits.context_length} tokens (at most {room} may be requested)",
            )
    return Sampling(
        temperature=limits.default_temperature if temperature is None else float(temperature),
        top_p=limits.default_top_p if top_p is None else float(top_p),
        top_k=0 if top_k is None else int(top_k),
        max_tokens=min(limits.default_max_tokens, room) if max_tokens is None else int(max_tokens),
        stop=tuple(stop),
        seed=seed,
        repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
    )

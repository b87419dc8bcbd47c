"""What makes two requests answerable by one answer.

A request splits into:

* its **namespace** — everything that must be identical for any hit: model,
  tenant and cache salt, chat vs raw prompt, the whole conversation before
  the last user message (system prompt and earlier turns), and the sampling
  parameters that change the answer (temperature, top_p, top_k, max_tokens,
  stop, seed, repetition penalty — resolved, defaults filled in);
* its **query** — the last user message (or the raw prompt), the only part a
  semantic hit may paraphrase;
* its **exact key** — namespace + normalised query (Unicode NFKC, whitespace
  collapsed, trimmed): the exact tier.

Everything is hashed (SHA-256), so the cache keeps no conversation history,
only the query text it needs for the hit policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import unicodedata

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import InvalidArgument

_SPACES = re.compile(r"\s+")
ROLES = ("system", "user", "assistant")


def normalize(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, trimmed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()


@dataclasses.dataclass(frozen=True, slots=True)
class KeyParts:
    """A request as the cache sees it."""

    namespace: bytes  # SHA-256 of everything a hit must share
    exact: bytes  # SHA-256 of namespace + normalised query
    query: str  # normalised last user message or prompt
    model: str  # for invalidation by model
    tenant: str  # for invalidation by tenant


def deterministic(sampling: common_pb2.SamplingParams) -> bool:
    """Greedy decoding or a fixed seed: the same request gives the same answer."""
    return (sampling.HasField("temperature") and sampling.temperature == 0.0) or sampling.HasField("seed")


def key_parts(key) -> KeyParts:
    """Split a ``semcache.v1.CacheKey``; raises InvalidArgument naming the field."""
    if not key.model:
        raise InvalidArgument("key.model", "is required")
    if key.prompt and key.messages:
        raise InvalidArgument("key.prompt", "set either prompt or messages, not both")
    if key.messages:
        for i, m in enumerate(key.messages):
            if m.role not in ROLES:
                raise InvalidArgument(f"key.messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {m.role!r}")
        if key.messages[-1].role != "user":
            raise InvalidArgument("key.messages", "the last message must be the user's question")
        query, context, mode = key.messages[-1].content, key.messages[:-1], "chat"
    elif key.prompt:
        query, context, mode = key.prompt, (), "prompt"
    else:
        raise InvalidArgument("key.messages", "a conversation or a prompt is required")
    q = normalize(query)
    if not q:
        raise InvalidArgument("key.messages" if mode == "chat" else "key.prompt", "the question is empty")
    h = hashlib.sha256()
    for part in (key.model, key.tenant.id, key.tenant.cache_salt, mode, *_sampling_parts(key.sampling)):
        _feed(h, part)
    for m in context:
        _feed(h, m.role)
        _feed(h, normalize(m.content))
    namespace = h.digest()
    return KeyParts(namespace, hashlib.sha256(namespace + q.encode()).digest(), q, key.model, key.tenant.id)


def _sampling_parts(s: common_pb2.SamplingParams) -> list[str]:
    def val(name: str) -> str:
        if not s.HasField(name):
            return "-"
        v = getattr(s, name)
        return repr(round(v, 6)) if isinstance(v, float) and math.isfinite(v) else repr(v)

    return [*(val(n) for n in ("temperature", "top_p", "top_k", "max_tokens", "seed", "repetition_penalty")), repr(list(s.stop))]


def _feed(h, part: str) -> None:
    b = part.encode()
    h.update(len(b).to_bytes(4, "big"))
    h.update(b)

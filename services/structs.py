"""Typed messages inside a service, named after the pipeline stage.

Across processes everything is protobuf; inside one, these frozen slotted
dataclasses are what domain code sees (``convert.py`` maps between the two).
Keep this module to struct definitions.
"""

from __future__ import annotations

import dataclasses
import enum


class Finish(str, enum.Enum):
    """Why generation ended (mirrors common.v1.FinishReason)."""

    STOP = "stop"  # end-of-sequence token or a stop sequence
    LENGTH = "length"  # max_tokens or the context window
    CANCELLED = "cancelled"  # caller went away or its deadline passed
    ERROR = "error"  # engine failure


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters with every default resolved."""

    temperature: float  # 0 = greedy
    top_p: float  # nucleus mass in (0, 1]
    top_k: int  # 0 = disabled
    max_tokens: int  # >= 1, fits the context window with the prompt
    stop: tuple[str, ...] = ()  # stop sequences, not included in the output
    seed: int | None = None  # None = random
    repetition_penalty: float = 1.0  # 1.0 = disabled


LEVEL_NAMES = {1: "critical", 2: "interactive", 3: "batch", 4: "background"}  # common.v1.Priority values
DEFAULT_LEVEL = 2  # UNSPECIFIED (0) and unknown values count as INTERACTIVE


def level_of(priority: int) -> int:
    """The priority level a request's ``priority`` field means."""
    return priority if priority in LEVEL_NAMES else DEFAULT_LEVEL


def latency_sensitive(priority: int) -> bool:
    """Critical and interactive work: served first by the scheduler and allowed to preempt batch work in an engine."""
    return level_of(priority) <= DEFAULT_LEVEL


@dataclasses.dataclass(frozen=True, slots=True)
class ValidatedRequest:
    """Output of the tokenizer: checked, templated, tokenized."""

    request_id: str  # fabric-wide id
    model: str  # resolved model name
    prompt_token_ids: tuple[int, ...]  # engine token ids
    sampling: Sampling  # resolved sampling
    tenant_id: str = ""  # "" = default tenant
    cache_salt: str = ""  # extra cache namespace inside the tenant
    priority: int = 0  # common.v1.Priority value


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting of one request."""

    prompt_tokens: int  # prompt length
    completion_tokens: int  # generated tokens
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True, slots=True)
class TokenChunk:
    """What an engine yields: new tokens, the text they completed and, on
    the last chunk, why it ended and the usage."""

    token_ids: tuple[int, ...]  # ids since the previous chunk
    text: str  # UTF-8-safe text delta
    finish: Finish | None = None  # set on the last chunk
    usage: Usage | None = None  # set on the last chunk

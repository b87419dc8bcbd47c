"""Render a conversation with the model's own chat template (the Jinja2
source stored in the GGUF as ``tokenizer.chat_template``).

The result is a list of segments: template text (where special tokens such
as ``<|im_start|>`` are parsed as special) and message content (where they
are not), so a user cannot inject control tokens by typing them.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

from jinja2 import StrictUndefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """A piece of the rendered prompt."""

    text: str  # the text
    special: bool  # True for template text (special tokens allowed)


class ChatTemplateError(ValueError):
    """The template failed on this conversation (e.g. roles out of order)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> list[Segment]:
        """Segments of the prompt for ``messages`` ((role, content) pairs).

        Each message's content is rendered through a unique placeholder so it
        can be tokenized as plain text. If the result differs from the
        template's real rendering (a template that transforms content, e.g.
        ``| trim``), the real rendering is returned as one special segment and
        ``exact`` is False: the caller must then refuse content that contains
        control-token text.
        """
        marks = [f"\x00{secrets.token_hex(8)}\x00" for _ in messages]
        rendered = self._render([{"role": r, "content": m} for (r, _), m in zip(messages, marks)], add_generation_prompt)
        segments: list[Segment] = []
        rest = rendered
        for mark, (_, content) in zip(marks, messages):
            head, found, tail = rest.partition(mark)
            if not found:  # the template dropped this message (e.g. no system role)
                continue
            if head:
                segments.append(Segment(head, True))
            if content:
                segments.append(Segment(content, False))
            rest = tail
        if rest:
            segments.append(Segment(rest, True))
        real = self._render([{"role": r, "content": c} for r, c in messages], add_generation_prompt)
        if "".join(seg.text for seg in segments) != real:
            return [Segment(real, True)]
        return segments

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

"""Turn a client request into a ValidatedRequest: check it, apply the chat
template, tokenize with the engine's own vocabulary, fit max_tokens."""

from __future__ import annotations

from collections.abc import Sequence

from llmfabric.models.catalog import ModelSpec
from llmfabric.models.chat_template import ChatTemplate, ChatTemplateError
from llmfabric.models.gguf import GgufModel
from llmfabric.runtime.errors import InvalidArgument, NotFound
from llmfabric.structs import Sampling, ValidatedRequest

from .validation import Limits, check_messages, check_text, resolve_sampling


class Preparer:
    """Validation + templating + tokenization for one model."""

    def __init__(self, spec: ModelSpec, model: GgufModel, limits: Limits) -> None:
        self.spec = spec
        self.model = model
        self.limits = limits
        self.template = ChatTemplate(
            model.chat_template or _FALLBACK_TEMPLATE,
            bos_token=model.token_text(model.bos_id) if model.bos_id >= 0 else "",
            eos_token=model.token_text(model.eos_id) if model.eos_id >= 0 else "",
        )

    def resolve_model(self, requested: str) -> str:
        if not self.spec.matches(requested):
            raise NotFound(f"model {requested!r} does not exist; available: {self.spec.name}", field="model")
        return self.spec.name

    def tokenize_prompt(self, prompt: str) -> list[int]:
        check_text("prompt", prompt, self.limits)
        return self.model.tokenize(prompt, add_special=self.model.add_bos, parse_special=False)

    def tokenize_messages(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        msgs = check_messages(messages, self.limits)
        try:
            segments = self.template.render(msgs, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise InvalidArgument("messages", str(exc)) from None
        ids: list[int] = []
        bos = self.template.bos_token
        if self.model.add_bos and not (bos and segments and segments[0].text.startswith(bos)):
            ids.append(self.model.bos_id)
        if not any(self._has_special_text(content) for _, content in msgs):
            # the common case: tokenize the rendered prompt in one piece, exactly
            # as the model saw its training data (no split at content edges)
            return ids + self.model.tokenize("".join(seg.text for seg in segments), add_special=False, parse_special=True)
        if all(seg.special for seg in segments):
            raise InvalidArgument(
                "messages",
                "contains control-token text (such as <|im_start|>) that this model's chat template cannot keep as plain text",
            )
        # a message contains control-token text: tokenize it as plain text (no injection)
        for seg in segments:
            ids += self.model.tokenize(seg.text, add_special=False, parse_special=seg.special)
        return ids

    def _has_special_text(self, text: str) -> bool:
        return any(sp in text for sp in self.model.special_texts)

    def prepare(
        self,
        *,
        request_id: str,
        model: str,
        prompt: str | None,
        messages: Sequence[tuple[str, str]] | None,
        sampling: dict,
        tenant_id: str = "",
        cache_salt: str = "",
        priority: int = 0,
    ) -> ValidatedRequest:
        """``sampling`` holds the client's values (None/absent = default)."""
        name = self.resolve_model(model)
        if not 0 <= priority <= 4:
            raise InvalidArgument("options.priority", f"unknown priority {priority}; use PRIORITY_CRITICAL..PRIORITY_BACKGROUND")
        if prompt is not None and messages is not None:
            raise InvalidArgument("input", "set either prompt or messages, not both")
        if prompt is None and messages is None:
            raise InvalidArgument("prompt", "must not be empty (send a prompt or messages)")
        if prompt is not None:
            ids, field = self.tokenize_prompt(prompt), "prompt"
        else:
            ids, field = self.tokenize_messages(messages or []), "messages"
        resolved: Sampling = resolve_sampling(
            temperature=sampling.get("temperature"),
            top_p=sampling.get("top_p"),
            top_k=sampling.get("top_k"),
            max_tokens=sampling.get("max_tokens"),
            stop=tuple(sampling.get("stop") or ()),
            seed=sampling.get("seed"),
            repetition_penalty=sampling.get("repetition_penalty"),
            prompt_tokens=len(ids),
            limits=self.limits,
            vocab_size=self.model.n_vocab,
            input_field=field,
        )
        return ValidatedRequest(
            request_id=request_id,
            model=name,
            prompt_token_ids=tuple(ids),
            sampling=resolved,
            tenant_id=tenant_id,
            cache_salt=cache_salt,
            priority=priority,
        )


# ChatML, used only if a GGUF carries no template of its own.
_FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

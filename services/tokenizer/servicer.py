"""gRPC methods of llmfabric.tokenizer.v1.TokenizerService (thin: the
logic is in prepare.py and validation.py)."""

from __future__ import annotations

from llmfabric.common.v1 import common_pb2
from llmfabric.convert import request_to_pb
from llmfabric.runtime.errors import InvalidArgument, Unavailable
from llmfabric.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from .prepare import Preparer

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name


def sampling_dict(sp: common_pb2.SamplingParams) -> dict:
    """Client sampling values; absent optional fields stay None."""
    out: dict = {"stop": list(sp.stop)}
    for name in ("temperature", "top_p", "top_k", "max_tokens", "seed", "repetition_penalty"):
        out[name] = getattr(sp, name) if sp.HasField(name) else None
    return out


def _messages(conv: tokenizer_pb2.Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conv.messages]


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self) -> None:
        self.preparer: Preparer | None = None  # set once the vocabulary is loaded

    def _ready(self) -> Preparer:
        if self.preparer is None:
            raise Unavailable("tokenizer is still loading")
        return self.preparer

    async def Prepare(self, request, context):
        p = self._ready()
        which = request.WhichOneof("input")
        validated = p.prepare(
            request_id=request.request_id,
            model=request.model,
            prompt=request.prompt if which == "prompt" else None,
            messages=_messages(request.conversation) if which == "conversation" else None,
            sampling=sampling_dict(request.sampling),
            tenant_id=request.tenant.id,
            cache_salt=request.tenant.cache_salt,
            priority=request.priority,
        )
        return tokenizer_pb2.PrepareResponse(request=request_to_pb(validated), context_length=p.limits.context_length)

    async def Tokenize(self, request, context):
        p = self._ready()
        ids = p.model.tokenize(request.text, add_special=request.add_special_tokens, parse_special=request.parse_special)
        return tokenizer_pb2.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request, context):
        p = self._ready()
        bad = [t for t in request.token_ids if not 0 <= t < p.model.n_vocab]
        if bad:
            raise InvalidArgument("token_ids", f"ids out of range 0..{p.model.n_vocab - 1}: {bad[:5]}")
        if request.render_special:
            text = "".join(p.model.token_text(t) for t in request.token_ids)
        else:
            text = p.model.detokenize(list(request.token_ids))
        return tokenizer_pb2.DetokenizeResponse(text=text)

    async def CountTokens(self, request, context):
        p = self._ready()
        which = request.WhichOneof("input")
        if which == "conversation":
            ids = p.tokenize_messages(_messages(request.conversation))
        else:
            ids = p.tokenize_prompt(request.prompt)
        return tokenizer_pb2.CountTokensResponse(token_count=len(ids))

    async def GetModelInfo(self, request, context):
        p = self._ready()
        return tokenizer_pb2.GetModelInfoResponse(
            model=p.spec.name,
            context_length=p.limits.context_length,
            vocab_size=p.model.n_vocab,
            eos_token_ids=list(p.model.eog_ids),
            chat_template=p.template.source,
        )

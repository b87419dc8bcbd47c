"""Mapping between protobuf messages and the internal structs."""

from __future__ import annotations

from llmfabric.common.v1 import common_pb2
from llmfabric.structs import Finish, Sampling, TokenChunk, Usage, ValidatedRequest

_FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    Finish.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


def finish_to_pb(finish: Finish | None) -> int:
    return _FINISH_TO_PB[finish]


def finish_from_pb(value: int) -> Finish | None:
    return _FINISH_FROM_PB.get(value)


def sampling_to_pb(s: Sampling) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_tokens=s.max_tokens,
        stop=list(s.stop),
        repetition_penalty=s.repetition_penalty,
    )
    if s.seed is not None:
        pb.seed = s.seed
    return pb


def sampling_from_pb(pb: common_pb2.SamplingParams) -> Sampling:
    """A resolved SamplingParams (every field set by the tokenizer)."""
    return Sampling(
        temperature=pb.temperature,
        top_p=pb.top_p,
        top_k=pb.top_k,
        max_tokens=pb.max_tokens,
        stop=tuple(pb.stop),
        seed=pb.seed if pb.HasField("seed") else None,
        repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
    )


def request_to_pb(r: ValidatedRequest) -> common_pb2.TokenizedRequest:
    return common_pb2.TokenizedRequest(
        request_id=r.request_id,
        model=r.model,
        prompt_token_ids=list(r.prompt_token_ids),
        sampling=sampling_to_pb(r.sampling),
        tenant=common_pb2.Tenant(id=r.tenant_id, cache_salt=r.cache_salt),
        priority=r.priority,
    )


def request_from_pb(pb: common_pb2.TokenizedRequest) -> ValidatedRequest:
    return ValidatedRequest(
        request_id=pb.request_id,
        model=pb.model,
        prompt_token_ids=tuple(pb.prompt_token_ids),
        sampling=sampling_from_pb(pb.sampling),
        tenant_id=pb.tenant.id,
        cache_salt=pb.tenant.cache_salt,
        priority=pb.priority,
    )


def usage_to_pb(u: Usage | None) -> common_pb2.Usage | None:
    if u is None:
        return None
    return common_pb2.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        cached_tokens=u.cached_tokens,
    )


def usage_from_pb(pb: common_pb2.Usage) -> Usage:
    return Usage(pb.prompt_tokens, pb.completion_tokens, pb.cached_tokens)


def chunk_to_pb(c: TokenChunk) -> common_pb2.TokenChunk:
    pb = common_pb2.TokenChunk(token_ids=list(c.token_ids), text=c.text, finish_reason=finish_to_pb(c.finish))
    if c.usage is not None:
        pb.usage.CopyFrom(usage_to_pb(c.usage))
    return pb


def chunk_from_pb(pb: common_pb2.TokenChunk) -> TokenChunk:
    finish = finish_from_pb(pb.finish_reason)
    return TokenChunk(
        token_ids=tuple(pb.token_ids),
        text=pb.text,
        finish=finish,
        usage=usage_from_pb(pb.usage) if pb.HasField("usage") else None,
    )

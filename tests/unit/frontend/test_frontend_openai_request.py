"""frontend.openai_request: OpenAI JSON bodies → GenerationInput; every
rejection names the JSON field."""

from __future__ import annotations

import pytest

from llmfabric.common.v1 import common_pb2
from llmfabric.frontend.openai_request import OpenAIRequest, parse_chat, parse_completion
from llmfabric.runtime.errors import InvalidArgument

USER = [{"role": "user", "content": "hi"}]


def chat(**body) -> OpenAIRequest:
    body.setdefault("messages", USER)
    return parse_chat(body, "rid-1")


def completion(**body) -> OpenAIRequest:
    body.setdefault("prompt", "Once upon a time")
    return parse_completion(body, "rid-2")


def rejects(field: str, fn, *args, **kw) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as exc:
        fn(*args, **kw)
    assert exc.value.field == field, exc.value.message
    return exc.value


# ------------------------------------------------------------ happy paths


def test_minimal_chat():
    r = chat(model="smollm2")
    assert r.stream is False and r.include_usage is False
    inp = r.input
    assert inp.request_id == "rid-1"
    assert inp.model == "smollm2"
    assert inp.prompt is None
    assert inp.messages == (("user", "hi"),)
    assert inp.sampling == common_pb2.SamplingParams()  # nothing set: the tokenizer fills defaults


def test_model_defaults_to_empty():
    assert chat().input.model == ""


def test_tenant_and_priority_passed():
    r = parse_chat({"messages": USER}, "rid", tenant_id="acme", priority=3)
    assert (r.input.tenant_id, r.input.priority) == ("acme", 3)


def test_minimal_completion():
    r = completion()
    assert r.input.prompt == "Once upon a time"
    assert r.input.messages is None
    assert r.input.request_id == "rid-2"


def test_completion_prompt_list_of_one():
    assert completion(prompt=["only one"]).input.prompt == "only one"


def test_full_sampling():
    r = chat(
        max_tokens=20, temperature=0.3, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=42, stop=["\n", "END"],
        stream=True, stream_options={"include_usage": True}, user="u-1", presence_penalty=0.0,
        frequency_penalty=0.0, logit_bias={}, n=1, logprobs=False,
    )
    sp = r.input.sampling
    assert sp.max_tokens == 20
    assert sp.temperature == pytest.approx(0.3)
    assert sp.top_p == pytest.approx(0.9)
    assert sp.top_k == 40
    assert sp.repetition_penalty == pytest.approx(1.1)
    assert sp.seed == 42
    assert list(sp.stop) == ["\n", "END"]
    assert r.stream is True and r.include_usage is True


def test_unset_fields_stay_unset():
    sp = chat(temperature=0.0).input.sampling
    assert sp.HasField("temperature") and sp.temperature == 0.0
    for name in ("top_p", "top_k", "max_tokens", "seed", "repetition_penalty"):
        assert not sp.HasField(name)


def test_null_values_mean_default():
    sp = chat(temperature=None, top_p=None, max_tokens=None, seed=None, stop=None, top_k=None).input.sampling
    assert sp == common_pb2.SamplingParams()


def test_stop_string():
    assert list(chat(stop="###").input.sampling.stop) == ["###"]


def test_stop_empty_list():
    assert list(chat(stop=[]).input.sampling.stop) == []


def test_max_completion_tokens_wins():
    assert chat(max_tokens=100, max_completion_tokens=7).input.sampling.max_tokens == 7
    assert chat(max_completion_tokens=9).input.sampling.max_tokens == 9
    assert chat(max_tokens=5, max_completion_tokens=None).input.sampling.max_tokens == 5


def test_integral_float_accepted_for_integer():
    assert chat(max_tokens=16.0).input.sampling.max_tokens == 16


def test_top_k_minus_one_disables():
    sp = chat(top_k=-1).input.sampling
    assert sp.HasField("top_k") and sp.top_k == 0


def test_developer_role_is_system():
    r = chat(messages=[{"role": "developer", "content": "be nice"}, {"role": "user", "content": "hi"}])
    assert r.input.messages == (("system", "be nice"), ("user", "hi"))


def test_content_parts_joined():
    r = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}])
    assert r.input.messages == (("user", "Hello, world"),)


def test_content_none_and_missing_are_empty():
    r = chat(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": None}, {"role": "assistant"}])
    assert r.input.messages == (("user", "q"), ("assistant", ""), ("assistant", ""))


def test_unknown_roles_passed_to_tokenizer():
    # role values are validated by the tokenizer (which names messages[i].role)
    assert chat(messages=[{"role": "tool", "content": "x"}]).input.messages == (("tool", "x"),)


def test_logprobs_false_and_zero_ok():
    chat(logprobs=False, top_logprobs=0)
    chat(logprobs=0)


def test_include_usage_default_false_when_streaming():
    r = chat(stream=True)
    assert r.stream and not r.include_usage


def test_seed_bounds():
    assert chat(seed=0).input.sampling.seed == 0
    assert chat(seed=2**64 - 1).input.sampling.seed == 2**64 - 1


# ------------------------------------------------------------ rejections


@pytest.mark.parametrize("parse", [parse_chat, parse_completion])
@pytest.mark.parametrize("body", [[], "string", 3, None, [{"messages": USER}]])
def test_body_not_object(parse, body):
    rejects("body", parse, body, "rid")


@pytest.mark.parametrize("n", [2, 0, -1, "1"])
def test_n_not_one(n):
    rejects("n", chat, n=n)


@pytest.mark.parametrize("extra", [{"logprobs": True}, {"logprobs": 1}, {"top_logprobs": 3}])
def test_logprobs_rejected(extra):
    rejects("top_logprobs" if "top_logprobs" in extra else "logprobs", chat, **extra)


@pytest.mark.parametrize("stream", ["true", 1, 0, [], {}])
def test_stream_not_bool(stream):
    rejects("stream", chat, stream=stream)


@pytest.mark.parametrize("opts", ["yes", [1], 3])
def test_stream_options_not_object(opts):
    rejects("stream_options", chat, stream=True, stream_options=opts)


@pytest.mark.parametrize("model", [1, ["a"], {"name": "x"}])
def test_model_not_string(model):
    rejects("model", chat, model=model)


@pytest.mark.parametrize("messages", [None, "hi", {"role": "user"}, [], 5])
def test_messages_not_list(messages):
    body = {"messages": messages} if messages is not None else {}
    rejects("messages", parse_chat, body, "rid")


@pytest.mark.parametrize("item", ["hi", 3, None, ["user", "hi"]])
def test_message_not_object(item):
    rejects("messages[1]", chat, messages=[{"role": "user", "content": "a"}, item])


@pytest.mark.parametrize("role", [None, 3, ["user"]])
def test_role_not_string(role):
    msg = {"content": "x"} if role is None else {"role": role, "content": "x"}
    rejects("messages[0].role", chat, messages=[msg])


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "text"},
        {"type": "text", "text": 3},
        "just a string",
        {"text": "no type"},
    ],
)
def test_non_text_part(part):
    err = rejects(
        "messages[1].content[1]",
        chat,
        messages=[{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "ok"}, part]}],
    )
    assert "text" in err.message


@pytest.mark.parametrize("content", [3, {"type": "text", "text": "x"}, True])
def test_content_wrong_type(content):
    rejects("messages[0].content", chat, messages=[{"role": "user", "content": content}])


@pytest.mark.parametrize("stop", [3, [1, 2], ["ok", None], {"a": 1}, True])
def test_stop_wrong_type(stop):
    rejects("stop", chat, stop=stop)


@pytest.mark.parametrize("value", [1.5, "10", True, [10], float("inf"), float("nan")])
def test_max_tokens_not_integer(value):
    rejects("max_tokens", chat, max_tokens=value)


def test_max_completion_tokens_not_integer():
    rejects("max_completion_tokens", chat, max_completion_tokens=2.5)


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1])
def test_max_tokens_out_of_int32(value):
    rejects("max_tokens", chat, max_tokens=value)


def test_negative_max_tokens_left_to_tokenizer():
    # in int32 range: the tokenizer's validation rejects it as sampling.max_tokens
    assert chat(max_tokens=-1).input.sampling.max_tokens == -1


@pytest.mark.parametrize("key", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", ["hot", True, False, [1], {"v": 1}, float("nan"), float("inf")])
def test_float_fields_wrong_type(key, value):
    rejects(key, chat, **{key: value})


@pytest.mark.parametrize("value", [1.5, "5", -2, 2**31])
def test_top_k_rejected(value):
    rejects("top_k", chat, top_k=value)


@pytest.mark.parametrize("value", [-1, 2**64, 1.5, "7"])
def test_seed_rejected(value):
    rejects("seed", chat, seed=value)


def test_echo_and_suffix_rejected():
    rejects("echo", completion, echo=True)
    rejects("suffix", completion, suffix="the end")
    completion(echo=False, suffix="")  # falsy values are fine


@pytest.mark.parametrize("prompt", [None, 3, ["a", "b"], [1, 2, 3], [], {"text": "x"}])
def test_completion_prompt_wrong_type(prompt):
    body = {} if prompt is None else {"prompt": prompt}
    rejects("prompt", parse_completion, body, "rid")


def test_completion_common_checks():
    rejects("n", completion, n=3)
    rejects("stream", completion, stream="yes")
    rejects("temperature", completion, temperature="hot")


def test_first_error_reported_for_chat_checks_order():
    # n is checked before messages
    rejects("n", parse_chat, {"n": 2, "messages": "bad"}, "rid")


# ------------------------------------------------------------ known gaps


@pytest.mark.parametrize("key", ["max_tokens", "temperature", "seed", "top_k"])
def test_huge_integer_is_invalid_argument(key):
    rejects(key, chat, **{key: 10**400})


@pytest.mark.parametrize("key", ["n", "stream"])
def test_null_n_and_stream_mean_default(key):
    r = chat(**{key: None})
    assert r.stream is False

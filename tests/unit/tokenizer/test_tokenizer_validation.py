"""tokenizer.validation: every rejection is InvalidArgument naming its
field; defaults are filled; checked both as pure functions and through
Preparer.prepare with the real vocabulary."""

from __future__ import annotations

import math

import grpc
import pytest

from llmfabric.models.catalog import DEFAULT_MODEL, default_model
from llmfabric.models.gguf import GgufModel
from llmfabric.runtime.errors import InvalidArgument
from llmfabric.structs import Sampling
from llmfabric.tokenizer.prepare import Preparer
from llmfabric.tokenizer.validation import Limits, check_messages, check_text, resolve_sampling

LIMITS = Limits(context_length=2048)
VOCAB = 49152


def resolve(limits: Limits = LIMITS, prompt_tokens: int = 10, **kw) -> Sampling:
    args = dict(temperature=None, top_p=None, top_k=None, max_tokens=None, stop=(), seed=None,
                repetition_penalty=None)
    args.update(kw)
    return resolve_sampling(**args, prompt_tokens=prompt_tokens, limits=limits, vocab_size=VOCAB)


def rejects(field: str, fn, *args, **kw) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as exc:
        fn(*args, **kw)
    err = exc.value
    assert err.field == field, err.message
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.message.startswith(field + ": ")
    return err


# ------------------------------------------------------------ check_text


def test_check_text_ok_returns_bytes():
    assert check_text("prompt", "héllo", LIMITS) == len("héllo".encode())


def test_check_text_empty():
    rejects("prompt", check_text, "prompt", "", LIMITS)
    assert check_text("x", "", LIMITS, allow_empty=True) == 0


@pytest.mark.parametrize("bad", ["\ud800", "ok \udfff", "a\ud83d"])
def test_check_text_lone_surrogate(bad):
    err = rejects("prompt", check_text, "prompt", bad, LIMITS)
    assert "UTF-8" in err.message


def test_check_text_not_a_string():
    rejects("prompt", check_text, "prompt", b"bytes", LIMITS)


def test_check_text_size_limit_counts_bytes():
    limits = Limits(context_length=2048, max_request_bytes=8)
    assert check_text("prompt", "12345678", limits) == 8
    err = rejects("prompt", check_text, "prompt", "123456789", limits)
    assert "9 bytes" in err.message and "8" in err.message
    rejects("prompt", check_text, "prompt", "世世世", limits)  # 9 bytes, 3 characters


# ------------------------------------------------------------ check_messages


def test_messages_ok():
    msgs = [("system", "s"), ("user", "u"), ("assistant", "a"), ("user", "u2")]
    assert check_messages(msgs, LIMITS) == msgs


def test_messages_empty():
    rejects("messages", check_messages, [], LIMITS)


@pytest.mark.parametrize("role", ["tool", "developer", "User", "", "function"])
def test_unknown_role(role):
    err = rejects("messages[1].role", check_messages, [("user", "a"), (role, "b")], LIMITS)
    assert repr(role) in err.message


def test_empty_user_content():
    rejects("messages[0].content", check_messages, [("user", "")], LIMITS)


def test_empty_assistant_allowed_mid_conversation():
    assert check_messages([("user", "a"), ("assistant", ""), ("user", "b")], LIMITS)


def test_empty_assistant_as_last_message_rejected():
    rejects("messages[1].content", check_messages, [("user", "a"), ("assistant", "")], LIMITS)


def test_surrogate_in_message():
    rejects("messages[2].content", check_messages, [("user", "a"), ("assistant", "b"), ("user", "\ud800")], LIMITS)


def test_too_many_messages():
    limits = Limits(context_length=2048, max_messages=3)
    rejects("messages", check_messages, [("user", "a")] * 4, limits)


def test_single_message_too_big():
    limits = Limits(context_length=2048, max_request_bytes=10)
    rejects("messages[0].content", check_messages, [("user", "x" * 11)], limits)


def test_total_messages_too_big():
    limits = Limits(context_length=2048, max_request_bytes=10)
    err = rejects("messages", check_messages, [("user", "x" * 6), ("assistant", "y" * 6)], limits)
    assert "12" in err.message


# ------------------------------------------------------------ resolve_sampling


def test_defaults():
    s = resolve()
    assert s == Sampling(temperature=0.7, top_p=1.0, top_k=0, max_tokens=256, stop=(), seed=None,
                         repetition_penalty=1.0)


def test_default_max_tokens_capped_by_room():
    s = resolve(limits=Limits(context_length=100), prompt_tokens=90)
    assert s.max_tokens == 10


def test_custom_defaults_from_limits():
    limits = Limits(context_length=2048, default_max_tokens=32, default_temperature=0.2, default_top_p=0.9)
    s = resolve(limits=limits)
    assert (s.max_tokens, s.temperature, s.top_p) == (32, 0.2, 0.9)


@pytest.mark.parametrize("t", [0.0, 0.7, 2.0])
def test_temperature_ok(t):
    assert resolve(temperature=t).temperature == t


@pytest.mark.parametrize("t", [-0.01, 2.01, 100.0, math.nan, math.inf, -math.inf])
def test_temperature_rejected(t):
    rejects("sampling.temperature", resolve, temperature=t)


@pytest.mark.parametrize("p", [0.01, 0.5, 1.0])
def test_top_p_ok(p):
    assert resolve(top_p=p).top_p == p


@pytest.mark.parametrize("p", [0.0, -0.1, 1.0001, 2.0, math.nan, math.inf])
def test_top_p_rejected(p):
    rejects("sampling.top_p", resolve, top_p=p)


@pytest.mark.parametrize("k", [0, 1, 40, VOCAB])
def test_top_k_ok(k):
    assert resolve(top_k=k).top_k == k


@pytest.mark.parametrize("k", [-1, -100, VOCAB + 1, 2**31])
def test_top_k_rejected(k):
    err = rejects("sampling.top_k", resolve, top_k=k)
    assert str(VOCAB) in err.message


@pytest.mark.parametrize("r", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_ok(r):
    assert resolve(repetition_penalty=r).repetition_penalty == r


@pytest.mark.parametrize("r", [0.0, -1.0, 2.5, math.nan, math.inf])
def test_repetition_penalty_rejected(r):
    rejects("sampling.repetition_penalty", resolve, repetition_penalty=r)


def test_stop_ok():
    assert resolve(stop=("a", "\n\n", "END", "世界")).stop == ("a", "\n\n", "END", "世界")


def test_too_many_stops():
    err = rejects("sampling.stop", resolve, stop=("a", "b", "c", "d", "e"))
    assert "4" in err.message


def test_empty_stop():
    rejects("sampling.stop[1]", resolve, stop=("a", ""))


def test_overlong_stop():
    assert resolve(stop=("x" * 64,)).stop == ("x" * 64,)
    rejects("sampling.stop[0]", resolve, stop=("x" * 65,))


def test_surrogate_stop():
    rejects("sampling.stop[0]", resolve, stop=("\ud800",))


@pytest.mark.parametrize("m", [0, -1, -(2**31)])
def test_max_tokens_too_small(m):
    rejects("sampling.max_tokens", resolve, max_tokens=m)


def test_max_tokens_fits_exactly():
    assert resolve(limits=Limits(context_length=100), prompt_tokens=40, max_tokens=60).max_tokens == 60


def test_max_tokens_over_room():
    err = rejects("sampling.max_tokens", resolve, limits=Limits(context_length=100), prompt_tokens=40, max_tokens=61)
    assert "100" in err.message and "60" in err.message


def test_explicit_max_tokens_above_default_ok():
    assert resolve(max_tokens=1000).max_tokens == 1000


@pytest.mark.parametrize("prompt_tokens", [100, 101, 5000])
@pytest.mark.parametrize("input_field", ["prompt", "messages"])
def test_prompt_alone_fills_window(prompt_tokens, input_field):
    with pytest.raises(InvalidArgument) as exc:
        resolve_sampling(
            temperature=None, top_p=None, top_k=None, max_tokens=None, stop=(), seed=None,
            repetition_penalty=None, prompt_tokens=prompt_tokens, limits=Limits(context_length=100),
            vocab_size=VOCAB, input_field=input_field,
        )
    assert exc.value.field == input_field
    assert str(prompt_tokens) in exc.value.message


def test_prefix_configurable():
    with pytest.raises(InvalidArgument) as exc:
        resolve_sampling(
            temperature=5.0, top_p=None, top_k=None, max_tokens=None, stop=(), seed=None,
            repetition_penalty=None, prompt_tokens=1, limits=LIMITS, vocab_size=VOCAB, prefix="",
        )
    assert exc.value.field == "temperature"


def test_seed_passed_through():
    assert resolve(seed=0).seed == 0
    assert resolve(seed=2**63).seed == 2**63


def test_int_values_become_floats():
    s = resolve(temperature=1, top_p=1, repetition_penalty=1)
    assert all(isinstance(v, float) for v in (s.temperature, s.top_p, s.repetition_penalty))


# ------------------------------------------------------------ through Preparer (real vocabulary)


@pytest.fixture(scope="module")
def model():
    m = GgufModel(default_model(DEFAULT_MODEL).path, vocab_only=True)
    yield m
    m.close()


@pytest.fixture(scope="module")
def prep(model) -> Preparer:
    return Preparer(default_model(DEFAULT_MODEL), model, Limits(context_length=2048, max_request_bytes=4096))


def prepare(prep: Preparer, prompt=None, messages=None, **sampling):
    if prompt is None and messages is None:
        prompt = "Hello"
    return prep.prepare(request_id="r", model="", prompt=prompt, messages=messages, sampling=sampling)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="\ud800"), "prompt"),
        (dict(prompt="x" * 4097), "prompt"),
        (dict(messages=[]), "messages"),
        (dict(messages=[("user", "")]), "messages[0].content"),
        (dict(messages=[("user", "a"), ("robot", "b")]), "messages[1].role"),
        (dict(messages=[("user", "\ud800")]), "messages[0].content"),
        (dict(messages=[("user", "x" * 3000), ("user", "y" * 3000)]), "messages"),
        (dict(temperature=-1.0), "sampling.temperature"),
        (dict(temperature=2.5), "sampling.temperature"),
        (dict(temperature=math.nan), "sampling.temperature"),
        (dict(top_p=0.0), "sampling.top_p"),
        (dict(top_p=1.5), "sampling.top_p"),
        (dict(top_k=-1), "sampling.top_k"),
        (dict(top_k=10**6), "sampling.top_k"),
        (dict(repetition_penalty=0.0), "sampling.repetition_penalty"),
        (dict(repetition_penalty=3.0), "sampling.repetition_penalty"),
        (dict(stop=["a", "b", "c", "d", "e"]), "sampling.stop"),
        (dict(stop=["ok", ""]), "sampling.stop[1]"),
        (dict(stop=["z" * 65]), "sampling.stop[0]"),
        (dict(max_tokens=0), "sampling.max_tokens"),
        (dict(max_tokens=2048), "sampling.max_tokens"),
        (dict(messages=[("user", "hi")], max_tokens=2040), "sampling.max_tokens"),
    ],
)
def test_prepare_rejections_name_field(prep, kwargs, field):
    with pytest.raises(InvalidArgument) as exc:
        prepare(prep, **kwargs)
    assert exc.value.field == field
    assert exc.value.info().field == field


def test_prepare_prompt_alone_too_long(model):
    p = Preparer(default_model(DEFAULT_MODEL), model, Limits(context_length=64))
    with pytest.raises(InvalidArgument) as exc:
        prepare(p, prompt="lorem ipsum " * 100)
    assert exc.value.field == "prompt"
    with pytest.raises(InvalidArgument) as exc:
        prepare(p, messages=[("user", "lorem ipsum " * 100)])
    assert exc.value.field == "messages"


def test_prepare_defaults(prep):
    v = prepare(prep, prompt="Hello")
    s = v.sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.seed, s.stop) == (0.7, 1.0, 0, 1.0, None, ())
    assert s.max_tokens == 256


def test_prepare_max_tokens_default_capped(model):
    p = Preparer(default_model(DEFAULT_MODEL), model, Limits(context_length=300, default_max_tokens=256))
    v = prepare(p, messages=[("user", "word " * 60)])
    assert len(v.prompt_token_ids) > 44
    assert v.sampling.max_tokens == 300 - len(v.prompt_token_ids)


def test_prepare_none_values_mean_default(prep):
    v = prep.prepare(
        request_id="r", model="", prompt="x", messages=None,
        sampling={"temperature": None, "top_p": None, "top_k": None, "max_tokens": None, "stop": [], "seed": None,
                  "repetition_penalty": None},
    )
    assert v.sampling.temperature == 0.7

"""models.gguf and models.catalog with the real SmolLM2 vocabulary
(vocab_only: no weights, loads in milliseconds). Token ids must be exactly
llama-cpp-python's own."""

from __future__ import annotations

import pathlib

import llama_cpp
import pytest

from llmfabric.models.catalog import DEFAULT_MODEL, ModelNotInstalled, ModelSpec, default_model, default_model_path
from llmfabric.models.detok import IncrementalDetokenizer
from llmfabric.models.gguf import GgufModel

TEXTS = [
    "Hello, world!",
    "hello",
    " leading space",
    "trailing space ",
    "héllo 😀 世界",
    "日本語のテキストです。",
    "emoji 👩‍👩‍👧‍👦 family and flags 🇫🇷🇯🇵",
    "   runs   of    spaces   ",
    "\n\n\nnewlines\n\n",
    "\ttabs\t\tand\r\nCRLF",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    '{"key": [1, 2.5, -3e10], "null": null}',
    "numbers 1234567890 3.14159 1,000,000",
    "MiXeD CaSe and ALLCAPS and camelCaseWords",
    "don't won't it's I'm we'll they've",
    "Ünïcödé àccénts ñ ß ø",
    "a",
    " ",
    "\n" + " " * 80,  # a single 81-byte token (longer than the 64-byte piece buffer)
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|> not really",
]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return default_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def model(spec) -> GgufModel:
    m = GgufModel(spec.path, vocab_only=True)
    yield m
    m.close()


@pytest.fixture(scope="module")
def llama(spec) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(spec.path), vocab_only=True, verbose=False)


# ------------------------------------------------------------ tokenize


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special", [False, True])
@pytest.mark.parametrize("parse_special", [False, True])
def test_token_ids_match_llama_cpp_python(model, llama, text, add_special, parse_special):
    ours = model.tokenize(text, add_special=add_special, parse_special=parse_special)
    theirs = llama.tokenize(text.encode(), add_bos=add_special, special=parse_special)
    assert ours == theirs


def test_empty_text(model, llama):
    assert model.tokenize("", add_special=False, parse_special=False) == []
    assert model.tokenize("", add_special=True, parse_special=False) == llama.tokenize(b"", add_bos=True, special=False)


def test_long_text_matches(model, llama):
    text = ("The quick brown fox jumps over the lazy dog. 🦊 狐狸 " * 300).strip()
    ours = model.tokenize(text, add_special=False, parse_special=False)
    assert ours == llama.tokenize(text.encode(), add_bos=False, special=False)
    assert len(ours) > 1000


def test_special_tokens_only_parsed_when_asked(model):
    text = "<|im_start|>"
    assert model.tokenize(text, add_special=False, parse_special=True) == [model.bos_id]
    plain = model.tokenize(text, add_special=False, parse_special=False)
    assert model.bos_id not in plain and len(plain) > 1


def test_add_special_follows_vocab(model):
    # SmolLM2 adds no BOS; add_special must not invent one
    assert model.add_bos is False
    assert model.tokenize("hi", add_special=True, parse_special=False) == model.tokenize(
        "hi", add_special=False, parse_special=False
    )


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_round_trip(model, text):
    ids = model.tokenize(text, add_special=False, parse_special=False)
    assert model.detokenize(ids) == text


# ------------------------------------------------------------ pieces


def test_pieces_match_llama_cpp_python(model, llama):
    # llama-cpp-python's detokenize truncates pieces longer than 32 bytes, so compare short ones
    checked = 0
    for tok in range(0, model.n_vocab, 7):
        ours = model.piece(tok)
        if len(ours) < 32:
            assert ours == llama.detokenize([tok]), tok
            checked += 1
    assert checked > 5000


def test_long_piece_uses_retry_path(model):
    ids = model.tokenize("\n" + " " * 80, add_special=False, parse_special=False)
    assert len(ids) == 1
    assert model.piece(ids[0]) == b"\n" + b" " * 80
    assert model.piece(ids[0]) == model.piece(ids[0])  # cached


def test_special_tokens_have_empty_piece(model):
    for tok in (model.bos_id, model.eos_id, *model.eog_ids):
        assert model.piece(tok) == b""


def test_token_text_renders_specials(model):
    assert model.token_text(model.bos_id) == "<|im_start|>"
    assert model.token_text(model.eos_id) == "<|im_end|>"
    hello = model.tokenize("hello", add_special=False, parse_special=False)
    assert "".join(model.token_text(t) for t in hello) == "hello"


def test_multibyte_pieces_are_partial_utf8(model):
    ids = model.tokenize("😀", add_special=False, parse_special=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji
    assert b"".join(model.piece(t) for t in ids) == "😀".encode()


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_incremental_detok_with_real_pieces(model, text):
    ids = model.tokenize(text, add_special=False, parse_special=False)
    det = IncrementalDetokenizer(model.piece)
    out = ""
    consumed = b""
    for t in ids:
        delta = det.push(t)
        consumed += model.piece(t)
        out += delta
        assert "\ufffd" not in delta
        assert consumed.startswith(out.encode())  # never ahead of the bytes, never half a char
    out += det.finish()
    assert out == text


def test_detokenize_replaces_invalid_utf8(model):
    ids = model.tokenize("😀", add_special=False, parse_special=False)
    assert model.detokenize(ids[:1]) == "\ufffd"


# ------------------------------------------------------------ metadata


def test_vocab_facts(model):
    assert model.n_vocab == 49152
    assert model.bos_id == 1 and model.eos_id == 2
    assert model.eos_id in model.eog_ids
    assert all(model.is_eog(t) for t in model.eog_ids)
    assert not model.is_eog(model.tokenize("a", add_special=False, parse_special=False)[0])


def test_meta(model):
    assert model.meta("general.architecture") == "llama"
    assert model.meta("no.such.key") == ""


def test_chat_template_from_gguf(model):
    tpl = model.chat_template
    assert "<|im_start|>" in tpl and "add_generation_prompt" in tpl
    assert tpl == model.meta("tokenizer.chat_template")


def test_close_is_idempotent(spec):
    m = GgufModel(spec.path, vocab_only=True)
    m.close()
    assert m.handle is None
    m.close()


def test_bad_path_raises(tmp_path):
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"GGUF but not really")
    with pytest.raises(RuntimeError, match="could not load"):
        GgufModel(bogus, vocab_only=True)


# ------------------------------------------------------------ catalog


def test_default_model(spec):
    assert spec.name == DEFAULT_MODEL
    assert spec.path.is_file()
    assert spec.path.suffix == ".gguf"


@pytest.mark.parametrize(
    "requested", ["", "  ", DEFAULT_MODEL, DEFAULT_MODEL.upper(), " smollm2 ", "SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"]
)
def test_matches_default_and_aliases(spec, requested):
    assert spec.matches(requested)


@pytest.mark.parametrize("requested", ["gpt-4o", "smollm3", "smollm2-360m-instruct", "llama"])
def test_does_not_match_others(spec, requested):
    assert not spec.matches(requested)


def test_renamed_model_has_no_aliases(monkeypatch):
    monkeypatch.setenv("LLMFABRIC_MODEL_NAME", "my-model")
    spec = default_model()
    assert spec.name == "my-model" and spec.aliases == ()
    assert spec.matches("my-model") and spec.matches("")
    assert not spec.matches("smollm2")


def test_mixed_case_served_name_matches_itself():
    spec = ModelSpec(name="My-Model", path=pathlib.Path("x.gguf"))
    assert spec.matches("My-Model")


def test_model_path_override(monkeypatch, spec):
    monkeypatch.setenv("LLMFABRIC_MODEL_PATH", str(spec.path))
    assert default_model_path() == spec.path


def test_model_path_override_missing(monkeypatch, tmp_path):
    missing = tmp_path / "missing.gguf"
    monkeypatch.setenv("LLMFABRIC_MODEL_PATH", str(missing))
    with pytest.raises(ModelNotInstalled, match="LLMFABRIC_MODEL_PATH") as exc:
        default_model_path()
    assert str(missing) in str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)

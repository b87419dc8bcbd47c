"""Weights re-encoding: cached once, same vocabulary, same greedy answer quality."""

from __future__ import annotations

import pytest

from llmfabric.models.catalog import default_model
from llmfabric.models.gguf import GgufModel
from llmfabric.models.requant import requantized


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFABRIC_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_original_is_the_wheel_file(cache):
    src = default_model().path
    assert requantized(src, "original") == src
    assert not list(cache.iterdir())


def test_q8_0_is_converted_once_and_cached(cache):
    src = default_model().path
    first = requantized(src, "q8_0")
    assert first.parent == cache and first.is_file() and first != src
    mtime = first.stat().st_mtime_ns
    assert requantized(src, "q8_0") == first
    assert first.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert not list(cache.glob("*.part"))  # no temporary left behind


def test_converted_model_has_the_same_vocabulary(cache):
    src = default_model().path
    a = GgufModel(src, vocab_only=True)
    b = GgufModel(requantized(src, "q8_0"), vocab_only=True)
    text = "<|im_start|>user\nHello wörld 😀 1234<|im_end|>\n"
    assert a.tokenize(text, add_special=False, parse_special=True) == b.tokenize(text, add_special=False, parse_special=True)
    assert a.chat_template == b.chat_template and a.eog_ids == b.eog_ids


def test_unknown_format_is_refused(cache):
    with pytest.raises(ValueError, match="q3_k"):
        requantized(default_model().path, "q3_k")

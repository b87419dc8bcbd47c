"""Property tests (hypothesis) for models.detok: random byte splits never
yield half a character; streamed stop matching equals one-shot truncation."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")

import os  # noqa: E402
import tempfile  # noqa: E402

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

# keep hypothesis' caches out of the repository
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "llmfabric-hypothesis"))

from llmfabric.models.detok import IncrementalDetokenizer, StopMatcher  # noqa: E402

# no example database: nothing is written outside the test run
SETTINGS = dict(deadline=None, database=None)


def split_at(data, cuts: list[int]) -> list:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def complete_prefix(data: bytes) -> str:
    """The longest prefix of ``data`` made of whole characters."""
    for end in range(len(data), -1, -1):
        try:
            return data[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""  # pragma: no cover


def run_detok(chunks: list[bytes]) -> tuple[list[str], str]:
    det = IncrementalDetokenizer(lambda t: chunks[t])
    return [det.push(t) for t in range(len(chunks))], det.finish()


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """One-shot truncation at the earliest stop sequence."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


# ------------------------------------------------------- detokenizer


@given(text=st.text(max_size=40), cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=30))
@settings(max_examples=300, **SETTINGS)
def test_random_splits_reassemble_exactly(text, cuts):
    data = text.encode("utf-8")  # hypothesis text() excludes lone surrogates
    chunks = split_at(data, cuts)
    deltas, tail = run_detok(chunks)
    assert "".join(deltas) == text
    assert tail == ""
    consumed, emitted = b"", ""
    for chunk, delta in zip(chunks, deltas):
        consumed += chunk
        emitted += delta
        # never half a character, never held back longer than needed
        assert emitted == complete_prefix(consumed)


@given(text=st.text(alphabet="aé世😀 \n", min_size=1, max_size=40))
@settings(max_examples=200, **SETTINGS)
def test_one_byte_tokens(text):
    data = text.encode()
    deltas, tail = run_detok([bytes([b]) for b in data])
    assert "".join(deltas) == text and tail == ""
    assert all(len(d) <= 1 for d in deltas)  # each byte completes at most one character
    assert "\ufffd" not in "".join(deltas)


@given(text=st.text(alphabet="aé世😀 \n", min_size=1, max_size=20), data=st.data())
@settings(max_examples=200, **SETTINGS)
def test_truncated_stream_ends_with_one_replacement(text, data):
    raw = text.encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    head = raw[:cut]
    deltas, tail = run_detok([bytes([b]) for b in head])
    whole = complete_prefix(head)
    assert "".join(deltas) == whole
    if len(whole.encode()) < len(head):  # an incomplete character was cut off
        assert tail == "\ufffd"
    else:
        assert tail == ""


# ------------------------------------------------------- stop matcher


def _no_containment(stops: list[str]) -> bool:
    """No stop strictly inside another (a prefix is fine). If one is, which
    one "comes first" depends on when generation would have stopped, so
    chunked and one-shot matching legitimately differ."""
    for a in stops:
        for b in stops:
            if a != b and a in b and not b.startswith(a):
                return False
    return True


@given(
    text=st.text(alphabet="abc!", max_size=30),
    stops=st.lists(st.text(alphabet="abc!", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=12),
)
@settings(max_examples=500, suppress_health_check=[HealthCheck.filter_too_much], **SETTINGS)
def test_streaming_matches_one_shot(text, stops, cuts):
    assume(_no_containment(stops))
    parts = split_at(text, cuts)
    expected, expect_stop = reference(text, stops)
    m = StopMatcher(stops)
    emitted = ""
    for part in parts:
        emitted += m.push(part)
        # never emits anything that is not in the final answer: in particular
        # never a prefix of a stop sequence that later completes
        assert expected.startswith(emitted)
    emitted += m.finish()
    assert emitted == expected
    assert m.stopped == expect_stop


@given(text=st.text(alphabet="ab", max_size=20), stop=st.text(alphabet="ab", min_size=1, max_size=5))
@settings(max_examples=300, **SETTINGS)
def test_char_by_char_single_stop(text, stop):
    m = StopMatcher([stop])
    emitted = "".join(m.push(c) for c in text) + m.finish()
    assert emitted == reference(text, [stop])[0]


@given(
    text=st.text(alphabet="héllo 😀 世界", max_size=20),
    stop=st.text(alphabet="héllo 😀 世界", min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=20),
)
@settings(max_examples=200, **SETTINGS)
def test_detok_then_stop_pipeline(text, stop, cuts):
    """Bytes split anywhere → detokenizer → stop matcher gives the one-shot answer."""
    chunks = split_at(text.encode(), cuts)
    det = IncrementalDetokenizer(lambda t: chunks[t])
    m = StopMatcher([stop])
    out = ""
    for t in range(len(chunks)):
        out += m.push(det.push(t))
    out += m.push(det.finish()) + m.finish()
    assert out == reference(text, [stop])[0]

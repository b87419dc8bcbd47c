"""models.detok: IncrementalDetokenizer never emits half a UTF-8 character;
StopMatcher never emits (a prefix of) a stop sequence."""

from __future__ import annotations

import pytest

from llmfabric.models.detok import IncrementalDetokenizer, StopMatcher

SAMPLE = "héllo 😀 世界"

# ----------------------------------------------------------------- helpers


class FakeVocab:
    """Token i is the i-th byte chunk it was built from."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def piece(self, token: int) -> bytes:
        return self.chunks[token]

    def ids(self) -> list[int]:
        return list(range(len(self.chunks)))


def complete_prefix(data: bytes) -> str:
    """The longest prefix of ``data`` made of whole characters."""
    for end in range(len(data), -1, -1):
        try:
            return data[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""  # pragma: no cover


def run_detok(chunks: list[bytes]) -> tuple[list[str], str]:
    vocab = FakeVocab(chunks)
    det = IncrementalDetokenizer(vocab.piece)
    return [det.push(t) for t in vocab.ids()], det.finish()


# ------------------------------------------------------- detokenizer


def test_one_byte_tokens_never_split_a_character():
    data = SAMPLE.encode()
    deltas, tail = run_detok([bytes([b]) for b in data])
    assert "".join(deltas) == SAMPLE
    assert tail == ""
    assert "\ufffd" not in "".join(deltas)
    # each character appears whole, in the delta of its last byte
    consumed = b""
    emitted = ""
    for byte, delta in zip(data, deltas):
        consumed += bytes([byte])
        emitted += delta
        assert emitted == complete_prefix(consumed)


def test_emoji_released_on_its_fourth_byte():
    emoji = "😀".encode()
    assert len(emoji) == 4
    deltas, tail = run_detok([emoji[:1], emoji[1:2], emoji[2:3], emoji[3:]])
    assert deltas == ["", "", "", "😀"]
    assert tail == ""


def test_cjk_split_across_tokens_with_ascii():
    data = "a世b".encode()  # a, 3 bytes, b
    deltas, _ = run_detok([data[:2], data[2:4], data[4:]])
    assert deltas == ["a", "世", "b"]


def test_whole_tokens_pass_through():
    deltas, tail = run_detok([b"Hello", b",", b" world"])
    assert deltas == ["Hello", ",", " world"]
    assert tail == ""


def test_empty_piece_emits_nothing():
    deltas, _ = run_detok([b"", b"x", b""])
    assert deltas == ["", "x", ""]


def test_finish_flushes_incomplete_tail_as_replacement():
    emoji = "😀".encode()
    deltas, tail = run_detok([b"ok ", emoji[:2]])
    assert deltas == ["ok ", ""]
    assert tail == "\ufffd"


def test_finish_with_nothing_held():
    det = IncrementalDetokenizer(lambda t: b"x")
    assert det.finish() == ""


def test_invalid_bytes_become_replacement_and_do_not_stall():
    deltas, tail = run_detok([b"a", b"\xff", b"b"])
    assert "".join(deltas) + tail == "a\ufffdb"


def test_truncated_sequence_followed_by_ascii():
    # a lead byte of a 3-byte char, then ASCII: the broken char is replaced, the ASCII kept
    deltas, tail = run_detok([b"\xe4\xb8", b"z"])
    assert "".join(deltas) + tail == "\ufffdz"


# ------------------------------------------------------- stop matcher


def feed(matcher: StopMatcher, parts: list[str]) -> tuple[list[str], str]:
    return [matcher.push(p) for p in parts], matcher.finish()


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """One-shot truncation at the earliest stop sequence."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def test_no_stops_passes_through():
    m = StopMatcher([])
    assert feed(m, ["a", "b", ""]) == (["a", "b", ""], "")
    assert not m.stopped


def test_empty_stop_strings_ignored():
    m = StopMatcher(["", ""])
    assert m.stops == ()
    assert m.push("anything") == "anything"


def test_stop_inside_one_chunk():
    m = StopMatcher(["END"])
    assert m.push("hello END world") == "hello "
    assert m.stopped
    assert m.push("more") == ""
    assert m.finish() == ""


def test_stop_at_very_start():
    m = StopMatcher(["###"])
    assert m.push("###tail") == ""
    assert m.stopped


def test_stop_split_across_chunks():
    m = StopMatcher(["</s>"])
    out = [m.push("answer <"), m.push("/"), m.push("s"), m.push("> junk")]
    assert out == ["answer ", "", "", ""]
    assert m.stopped
    assert m.finish() == ""


def test_stop_split_one_char_per_chunk():
    m = StopMatcher(["STOP"])
    emitted = "".join(m.push(c) for c in "go STOP now")
    assert emitted == "go "
    assert m.stopped


def test_held_prefix_released_when_not_a_stop():
    m = StopMatcher(["Hello"])
    assert m.push("say Hel") == "say "
    assert m.push("p!") == "Help!"
    assert not m.stopped


def test_held_prefix_released_by_finish():
    m = StopMatcher(["<|end|>"])
    assert m.push("text <|en") == "text "
    assert m.finish() == "<|en"
    assert not m.stopped
    assert m.finish() == ""  # released once


def test_multiple_stops_earliest_wins():
    m = StopMatcher(["world", "lo"])
    assert m.push("hello world") == "hel"
    assert m.stopped


def test_multiple_stops_earliest_wins_order_independent():
    for stops in (["BBB", "A"], ["A", "BBB"]):
        m = StopMatcher(stops)
        assert m.push("xBBByA") == "x"


def test_multiple_stops_across_chunks():
    m = StopMatcher(["\n\nUser:", "<|im_end|>"])
    parts = ["Sure.", "\n", "\nUs", "er: next"]
    deltas, tail = feed(m, parts)
    assert "".join(deltas) + tail == "Sure."
    assert m.stopped


def test_overlapping_prefix_candidates():
    # "aab": after "aa" the matcher must hold both a's (stop could start at either)
    m = StopMatcher(["aab"])
    assert m.push("xaa") == "x"
    assert m.push("ab") == "a"
    assert m.stopped


def test_repeated_partial_then_real_stop():
    m = StopMatcher(["abc"])
    out = "".join(m.push(p) for p in ["ab", "ab", "abx", "ab", "c", "zzz"])
    assert out == "abababx"  # partial matches released as they fail, then the final "abc" stops
    assert m.stopped


def test_text_after_stop_never_emitted():
    m = StopMatcher(["STOP"])
    out = [m.push(p) for p in ["a", "STOP", "b", "c", "STOPSTOP"]]
    assert out == ["a", "", "", "", ""]
    assert m.finish() == ""


def test_unicode_stop():
    m = StopMatcher(["世界"])
    assert m.push("你好世") == "你好"
    assert m.push("界!") == ""
    assert m.stopped


def test_detok_and_stop_together():
    data = "héllo 😀 世界 after".encode()
    vocab = FakeVocab([bytes([b]) for b in data])
    det = IncrementalDetokenizer(vocab.piece)
    m = StopMatcher(["世界"])
    out = ""
    for t in vocab.ids():
        out += m.push(det.push(t))
        if m.stopped:
            break
    out += m.push(det.finish()) + m.finish()
    assert out == "héllo 😀 "


@pytest.mark.parametrize("stops", [["x"], ["ab", "cd"], ["longer-stop"]])
def test_finish_after_stop_is_empty(stops):
    m = StopMatcher(stops)
    m.push("zz" + stops[0] + "zz")
    assert m.stopped
    assert m.finish() == ""

"""Incremental detokenization that never splits a UTF-8 character.

Byte-level BPE tokens are byte strings; a multi-byte character (an emoji,
CJK, accented letters) is often split over two or more tokens. The decoder
holds incomplete sequences back until the character is whole; ``finish``
flushes what is left (an incomplete tail becomes U+FFFD).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalDetokenizer:
    """Turns token ids into text deltas, one token at a time."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is partial)."""
        return self._decoder.decode(self._piece(token_id))

    def finish(self) -> str:
        """Whatever is still held back."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop sequences in streamed text without ever emitting a prefix
    of one: text that could still turn into a stop sequence is held back."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text safe to emit now; sets ``stopped`` when a stop matched."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        """Release held text once generation ends without a stop match."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

"""Latency-sensitive requests preempt batch work inside the embedded engine.

The scheduler keeps a slot free for interactive work, but a request that
reaches the engine still waits for the ``llama_decode`` step in flight (a
step over several batch sequences takes longer than an interactive request's
whole prefill on this CPU) and then shares its own step with every batch
sequence. Two rules remove both waits:

* **Abort the batch-only step in flight.** When a critical/interactive
  request arrives, ``request()`` raises a flag; llama.cpp polls the context's
  abort callback between graph nodes, so a step whose sequences are all
  batch/background stops within one node and ``llama_decode`` returns 2 with
  that ubatch's cells removed again (llama.h: "processed ubatches will
  remain", and a step is one ubatch here). The engine rewinds those
  sequences and runs them again later: the price is at most one wasted step
  per preempting arrival. A step that already serves latency-sensitive work
  is never aborted (``arm(False)`` points the callback at a flag that is
  never raised), so interactive arrivals cannot livelock each other.
* **Prefill alone.** While a latency-sensitive sequence is still prefilling,
  a step holds only latency-sensitive sequences (``EmbeddedEngine._step``);
  batch sequences pause for those steps.

The callback is libc's ``strlen`` over a two-byte buffer: it returns 1 when
the flag byte is set and 0 when not, which C reads as the ``bool`` the
callback type returns (the value fits the return register's low byte on
every ABI llama.cpp runs on). A Python callback would take the GIL at every
graph node of every step, stalling decode whenever the asyncio thread holds
it.
"""

from __future__ import annotations

import ctypes

import llama_cpp

_STRLEN = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value


class Preemption:
    """The abort flag of one llama.cpp context."""

    def __init__(self, ctx, enabled: bool = True) -> None:
        self.enabled = enabled
        self.preempted = 0  # steps aborted since start (engine thread writes)
        self._ctx = ctx
        self._flag = ctypes.create_string_buffer(2)  # b"\x01\x00" = abort requested
        self._never = ctypes.create_string_buffer(2)  # stays b"\x00\x00"
        self._callback = llama_cpp.ggml_abort_callback(_STRLEN)  # kept referenced while the context lives
        self._armed: bool | None = None

    def request(self) -> None:
        """A latency-sensitive request arrived (any thread)."""
        if self.enabled:
            self._flag[0] = b"\x01"

    def clear(self) -> None:
        """Engine thread, before it takes new arrivals from its inbox."""
        self._flag[0] = b"\x00"

    def arm(self, preemptible: bool) -> None:
        """Engine thread, before ``llama_decode``: may this step be aborted?"""
        preemptible = preemptible and self.enabled
        if preemptible != self._armed:
            data = self._flag if preemptible else self._never
            llama_cpp.llama_set_abort_callback(self._ctx, self._callback, ctypes.addressof(data))
            self._armed = preemptible

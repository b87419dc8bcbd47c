"""The wait queue in front of the workers.

Requests wait here until a worker has a free slot, ordered by (priority,
arrival): strict priority, FIFO inside a level. The tenant-fairness and
aging issue replaces the ordering key; admission (a bound on waiting
requests) is already here so memory never grows without bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import time

from llmfabric.runtime.errors import ResourceExhausted
from llmfabric.structs import ValidatedRequest


@dataclasses.dataclass(slots=True, eq=False)
class Waiter:
    """A request waiting for a worker slot."""

    request: ValidatedRequest  # what waits
    future: asyncio.Future  # resolved with the chosen worker
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)  # for wait-time metrics
    removed: bool = False  # lazily deleted from the heap
    exclude: frozenset = frozenset()  # workers not to use (a retry avoids the one that failed)


class RequestQueue:
    """Bounded priority queue of waiters."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._heap: list[tuple[int, int, Waiter]] = []
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, waiter: Waiter) -> None:
        """Admit ``waiter`` or reject at once with RESOURCE_EXHAUSTED."""
        if self._size >= self.max_waiting:
            raise ResourceExhausted(
                f"scheduler queue is full ({self.max_waiting} requests waiting); retry later", retry_after_ms=1000
            )
        priority = waiter.request.priority if 1 <= waiter.request.priority <= 4 else 2  # UNSPECIFIED/unknown: INTERACTIVE
        heapq.heappush(self._heap, (priority, next(self._seq), waiter))
        self._size += 1

    def peek(self) -> Waiter | None:
        """The next waiter to serve, without removing it."""
        while self._heap and self._heap[0][2].removed:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Waiter | None:
        waiter = self.peek()
        if waiter is not None:
            heapq.heappop(self._heap)
            waiter.removed = True  # a later remove() (cancel in the same turn) must not count it twice
            self._size -= 1
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """Forget a waiter that gave up (cancelled, deadline)."""
        if not waiter.removed:
            waiter.removed = True
            self._size -= 1

    def drain(self) -> list[Waiter]:
        """Remove and return every waiter."""
        out = []
        while (w := self.pop()) is not None:
            out.append(w)
        return out

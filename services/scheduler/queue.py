"""The wait queue in front of the workers: who runs next.

Order, decided here (workers get a request only when they have a free slot,
so no engine FIFO reorders it):

* **Strict priority between levels** (CRITICAL < INTERACTIVE < BATCH <
  BACKGROUND) **with aging**: a level's effective rank improves by one for
  every ``1 / aging_rate`` seconds its oldest request has waited, so a
  BATCH request waiting 10 s at the default rate (0.1 levels/s) competes as
  INTERACTIVE — nothing starves. ``aging_rate = 0`` disables aging.
* **Weighted fair sharing between tenants inside a level**: each tenant has
  a virtual time that advances by ``1 / weight`` per dispatched request; the
  tenant with the smallest virtual time goes next, and a tenant that was idle
  re-enters at the level's current virtual time (no banked credit), so a
  noisy tenant cannot starve a quiet one.
* **Admission**: each level is bounded by waiting requests and by waiting
  prompt tokens; beyond either, ``push`` raises RESOURCE_EXHAUSTED at once
  with a retry hint. Memory never grows without bound.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time

from llmfabric.runtime.errors import ResourceExhausted
from llmfabric.structs import LEVEL_NAMES, ValidatedRequest, level_of

LEVELS = (1, 2, 3, 4)  # common.v1.Priority: CRITICAL, INTERACTIVE, BATCH, BACKGROUND


@dataclasses.dataclass(slots=True, eq=False)
class Waiter:
    """A request waiting for a worker slot."""

    request: ValidatedRequest  # what waits
    future: asyncio.Future  # resolved with the chosen worker
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)  # for aging and wait metrics
    removed: bool = False  # no longer queued (popped, cancelled, expired)
    exclude: frozenset = frozenset()  # workers not to use (a retry avoids the one that failed)

    @property
    def level(self) -> int:
        return level_of(self.request.priority)

    @property
    def tenant(self) -> str:
        return self.request.tenant_id

    @property
    def tokens(self) -> int:
        return len(self.request.prompt_token_ids)


@dataclasses.dataclass(slots=True)
class _Tenant:
    queue: collections.deque  # its waiters in arrival order (removed ones skipped lazily)
    vtime: float = 0.0  # virtual time: advances 1/weight per dispatch


class _Level:
    """One priority level: per-tenant FIFOs served by weighted fair sharing."""

    def __init__(self) -> None:
        self.tenants: dict[str, _Tenant] = {}
        self.vclock = 0.0  # virtual time of the last dispatch at this level
        self.size = 0
        self.tokens = 0

    def push(self, w: Waiter) -> None:
        t = self.tenants.get(w.tenant)
        if t is None:
            t = self.tenants[w.tenant] = _Tenant(collections.deque(), self.vclock)
        elif not self._head(t):
            t.vtime = max(t.vtime, self.vclock)  # idle tenants do not bank credit
        t.queue.append(w)
        self.size += 1
        self.tokens += w.tokens

    @staticmethod
    def _head(t: _Tenant) -> Waiter | None:
        while t.queue and t.queue[0].removed:
            t.queue.popleft()
        return t.queue[0] if t.queue else None

    def next(self) -> tuple[str, Waiter] | None:
        """(tenant, waiter) to serve next: the smallest virtual time, then the
        oldest head."""
        best = None
        for name, t in list(self.tenants.items()):
            head = self._head(t)
            if head is None:
                if t.vtime <= self.vclock:
                    del self.tenants[name]  # nothing waiting and no debt: forget it
                continue
            key = (t.vtime, head.enqueued_at)
            if best is None or key < best[0]:
                best = (key, name, head)
        return None if best is None else (best[1], best[2])

    def oldest(self) -> float | None:
        heads = [h.enqueued_at for t in self.tenants.values() if (h := self._head(t)) is not None]
        return min(heads) if heads else None

    def take(self, tenant: str, weight: float) -> Waiter:
        t = self.tenants[tenant]
        w = t.queue.popleft()
        self.vclock = max(self.vclock, t.vtime)
        t.vtime += 1.0 / weight
        self.forget(w)
        return w

    def forget(self, w: Waiter) -> None:
        self.size -= 1
        self.tokens -= w.tokens


@dataclasses.dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Bounds and weights of the queue."""

    max_waiting: int = 256  # requests per level
    max_waiting_tokens: int = 1 << 20  # prompt tokens per level
    aging_rate: float = 0.1  # levels per second of waiting (0 = strict priority, no aging)
    tenant_weights: tuple[tuple[str, float], ...] = ()  # (tenant, weight); others weigh 1

    def weight(self, tenant: str) -> float:
        return dict(self.tenant_weights).get(tenant, 1.0)


class RequestQueue:
    """Priority levels with aging, tenant fairness inside each, bounded."""

    def __init__(self, max_waiting: int = 256, policy: QueuePolicy | None = None) -> None:
        self.policy = policy or QueuePolicy(max_waiting=max_waiting)
        self.levels = {level: _Level() for level in LEVELS}
        self._next: tuple[int, str, Waiter] | None = None  # cached choice, valid until a change

    def __len__(self) -> int:
        return sum(lv.size for lv in self.levels.values())

    def depth(self, level: int) -> int:
        return self.levels[level].size

    def push(self, waiter: Waiter) -> None:
        """Admit ``waiter`` or reject at once with RESOURCE_EXHAUSTED."""
        lv = self.levels[waiter.level]
        name = LEVEL_NAMES[waiter.level]
        if lv.size >= self.policy.max_waiting:
            raise ResourceExhausted(
                f"scheduler queue is full: {self.policy.max_waiting} {name} requests waiting; retry later",
                retry_after_ms=self._retry_hint(lv),
            )
        if lv.size and lv.tokens + waiter.tokens > self.policy.max_waiting_tokens:
            raise ResourceExhausted(
                f"scheduler queue for {name} requests holds {lv.tokens} prompt tokens "
                f"(limit {self.policy.max_waiting_tokens}); retry later",
                retry_after_ms=self._retry_hint(lv),
            )
        lv.push(waiter)
        self._next = None

    @staticmethod
    def _retry_hint(lv: _Level) -> int:
        return min(30_000, 500 + 50 * lv.size)

    def peek(self) -> Waiter | None:
        """The next waiter to serve, without removing it."""
        if self._next is not None and not self._next[2].removed:
            return self._next[2]
        self._next = None
        now = time.monotonic()
        best = None
        for level, lv in self.levels.items():
            choice = lv.next()
            if choice is None:
                continue
            oldest = lv.oldest() or now
            effective = level - int((now - oldest) * self.policy.aging_rate)
            key = (effective, level)
            if best is None or key < best[0]:
                best = (key, level, choice)
        if best is None:
            return None
        self._next = (best[1], best[2][0], best[2][1])
        return self._next[2]

    def pop(self) -> Waiter | None:
        waiter = self.peek()
        if waiter is None:
            return None
        level, tenant, _ = self._next  # type: ignore[misc]
        self._next = None
        taken = self.levels[level].take(tenant, self.policy.weight(tenant))
        assert taken is waiter
        waiter.removed = True  # a later remove() (cancel in the same turn) must not count it twice
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """Forget a waiter that gave up (cancelled, deadline)."""
        if not waiter.removed:
            waiter.removed = True
            self.levels[waiter.level].forget(waiter)
            self._next = None

    def drain(self) -> list[Waiter]:
        """Remove and return every waiter."""
        out = []
        while (w := self.pop()) is not None:
            out.append(w)
        return out

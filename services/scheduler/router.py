"""Routing policies: a ``str`` Enum plus one small class each.

Cache-aware routing arrives with the scheduler issue and plugs in here.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from typing import Protocol

from llmfabric.structs import ValidatedRequest

from .pool import WorkerHandle


class RoutingPolicy(str, enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"


class Router(Protocol):
    def pick(self, candidates: Sequence[WorkerHandle], request: ValidatedRequest) -> WorkerHandle:
        """Choose one of ``candidates`` (non-empty, all with a free slot)."""


class RoundRobinRouter:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[WorkerHandle], request: ValidatedRequest) -> WorkerHandle:
        ordered = sorted(candidates, key=lambda w: w.address)
        return ordered[next(self._counter) % len(ordered)]


class LeastLoadRouter:
    def pick(self, candidates: Sequence[WorkerHandle], request: ValidatedRequest) -> WorkerHandle:
        return min(candidates, key=lambda w: (w.in_flight / max(w.capacity, 1), w.in_flight, w.address))


def create_router(policy: RoutingPolicy | str) -> Router:
    policy = RoutingPolicy(policy)
    if policy is RoutingPolicy.ROUND_ROBIN:
        return RoundRobinRouter()
    return LeastLoadRouter()

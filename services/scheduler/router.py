"""Routing policies: a ``str`` Enum plus one small class each.

Every router's ``pick(candidates, request, workers)`` chooses one of
``candidates`` (workers with a free slot) knowing ``workers`` (every healthy
worker, for load comparisons; defaults to the candidates) and records why in
``last_reason`` and the ``decisions`` counter (reason -> count).

Cache-aware routing keeps, per worker (by address), an approximate radix
tree of the token prefixes routed there — the worker's own
:class:`~llmfabric.worker.radix.RadixCache`, namespaced by (model, tenant,
cache salt) so tenants never match each other's prefixes. A request goes:

1. *balance*: if load is imbalanced (max − min in-flight over the healthy
   workers > ``balance_abs_threshold`` AND max > min × ``balance_rel_threshold``)
   to a lightly loaded candidate — among those within
   ``balance_abs_threshold`` of the least load, the one with the longest
   match (then least load);
2. *cache_hit*: else to the candidate with the longest prefix match if
   match / prompt length ≥ ``cache_threshold`` (ties: least load, then
   smallest tree);
3. *miss*: else to the least-loaded candidate, then the smallest tree, then
   the one that got a miss longest ago.

The chosen worker's tree then gets the prompt. Each tree is evicted (LRU)
down to the worker's KV size (``kv_used + kv_free`` from its last GetLoad)
or ``tree_tokens`` when unknown. Reports correct the approximation: a
worker whose counters went backwards restarted (its tree is cleared); one
whose ``evictions_total`` rose, or whose ``kv_used`` fell by over half since
its last report (a flush), is trimmed (LRU first) to its ``kv_used``.

Known failure modes of SGLang's router and what this code does about them:

* **Hotspots on cache miss at low concurrency** (sglang #32983: every miss
  went to the same replica when concurrency < replicas, because ties on the
  smallest tree always broke the same way; #14305/#14650: misses went to
  the smallest tree even when that worker was the busiest). Here a miss goes
  to the least-loaded candidate first, then the smallest tree, then the
  worker whose last miss is oldest (a rotating tie-break, not address
  order), so consecutive misses at concurrency 1 spread over all workers and
  fill all their KV caches.
* **Affinity lost on rebalancing** (sglang #32195: the imbalanced path took
  the minimum-load worker outright and threw away every cached prefix). Here
  the balance path looks for the longest match among candidates within
  ``balance_abs_threshold`` of the least load; and a balance decision only
  *adds* the prompt to the chosen worker's tree — the worker that held it
  keeps it, so affinity returns once load evens out. Workers joining or
  leaving touch only their own tree (no hashing that remaps every prefix).
* **Counters reset by health checks** (vllm-project/router #197: the health
  checker zeroed the router's per-worker load counters while requests were
  in flight, so the policy saw a balanced fleet and kept piling prefix-affine
  requests on a saturated worker). Here in-flight counts belong to the
  dispatcher alone (incremented on lease, decremented on release); probes
  never touch them, and neither probes nor health flaps (unhealthy →
  healthy) clear a tree. Trees are cleared only when the worker itself
  shows it restarted (``prompt_tokens_total`` or ``evictions_total`` went
  down) or when it leaves discovery.
"""

from __future__ import annotations

import collections
import enum
import itertools
from collections.abc import Hashable, Iterable, Sequence
from typing import Protocol

from llmfabric.structs import ValidatedRequest
from llmfabric.worker.radix import RadixCache
from llmfabric.worker.v1 import worker_pb2

from .pool import BreakerState, WorkerHandle


class RoutingPolicy(str, enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"
    CACHE_AWARE = "cache_aware"


class RouteReason(str, enum.Enum):
    """Why a worker was chosen (a metrics label)."""

    POLICY = "policy"  # round-robin turn / least load: the policy's only rule
    CACHE_HIT = "cache_hit"  # longest prefix match above the threshold
    BALANCE = "balance"  # load imbalanced: a lightly loaded worker
    MISS = "miss"  # no good match: least load, then smallest tree


class Router(Protocol):
    last_reason: RouteReason  # reason of the last pick
    decisions: collections.Counter  # RouteReason -> picks

    def pick(
        self, candidates: Sequence[WorkerHandle], request: ValidatedRequest, workers: Iterable[WorkerHandle] = ()
    ) -> WorkerHandle:
        """Choose one of ``candidates`` (non-empty, all with a free slot);
        ``workers`` are all healthy workers (default: the candidates)."""


def _load(w: WorkerHandle) -> tuple:
    return (w.in_flight / max(w.capacity, 1), w.in_flight, w.address)


class RoundRobinRouter:
    def __init__(self) -> None:
        self._counter = itertools.count()
        self.last_reason = RouteReason.POLICY
        self.decisions: collections.Counter = collections.Counter()

    def pick(
        self, candidates: Sequence[WorkerHandle], request: ValidatedRequest, workers: Iterable[WorkerHandle] = ()
    ) -> WorkerHandle:
        ordered = sorted(candidates, key=lambda w: w.address)
        self.decisions[RouteReason.POLICY] += 1
        return ordered[next(self._counter) % len(ordered)]


class LeastLoadRouter:
    def __init__(self) -> None:
        self.last_reason = RouteReason.POLICY
        self.decisions: collections.Counter = collections.Counter()

    def pick(
        self, candidates: Sequence[WorkerHandle], request: ValidatedRequest, workers: Iterable[WorkerHandle] = ()
    ) -> WorkerHandle:
        self.decisions[RouteReason.POLICY] += 1
        return min(candidates, key=_load)


class _Tree:
    """One worker's approximate cache."""

    __slots__ = ("cache", "last_miss")

    def __init__(self) -> None:
        self.cache = RadixCache()  # values unused: no cells behind this tree
        self.last_miss = 0  # router clock of the last miss sent here (0 = never)


class CacheAwareRouter:
    """Prefix affinity under load-balance thresholds (see the module doc)."""

    def __init__(
        self,
        *,
        cache_threshold: float = 0.5,
        balance_abs_threshold: int = 3,
        balance_rel_threshold: float = 1.5,
        tree_tokens: int = 65536,
    ) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold={cache_threshold}: must be in [0, 1]")
        if balance_abs_threshold < 0 or balance_rel_threshold < 1.0:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if tree_tokens < 1:
            raise ValueError(f"tree_tokens={tree_tokens}: must be positive")
        self.cache_threshold = cache_threshold  # matched fraction of the prompt that counts as a hit
        self.balance_abs_threshold = balance_abs_threshold  # in-flight spread that may be imbalance
        self.balance_rel_threshold = balance_rel_threshold  # max/min in-flight ratio that may be imbalance
        self.tree_tokens = tree_tokens  # tree bound for a worker whose KV size is unknown
        self.trees: dict[str, _Tree] = {}  # worker address -> approximate tree
        self.last_reason = RouteReason.MISS
        self.last_match = 0  # matched tokens of the last pick on the chosen worker
        self.decisions: collections.Counter = collections.Counter()
        self._clock = itertools.count(1)

    # ------------------------------------------------------------- decision
    def pick(
        self, candidates: Sequence[WorkerHandle], request: ValidatedRequest, workers: Iterable[WorkerHandle] = ()
    ) -> WorkerHandle:
        ns = self.namespace(request)
        key = request.prompt_token_ids
        match = {w.address: self._match(w.address, ns, key) for w in candidates}
        # The load view: the candidates plus every healthy worker whose breaker
        # is closed (an open breaker's idle worker is not spare capacity).
        loads = [w.in_flight for w in candidates]
        loads += [w.in_flight for w in workers
                  if w.healthy and w.breaker.state is BreakerState.CLOSED and w not in candidates]
        lo, hi = min(loads), max(loads)

        def size(w: WorkerHandle) -> int:
            tree = self.trees.get(w.address)
            return tree.cache.total_tokens if tree else 0

        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            reason = RouteReason.BALANCE
            floor = min(w.in_flight for w in candidates)
            near = [w for w in candidates if w.in_flight <= floor + self.balance_abs_threshold]
            chosen = min(near, key=lambda w: (-match[w.address], _load(w)))
        else:
            top = max(match.values())
            if top > 0 and top / len(key) >= self.cache_threshold:
                reason = RouteReason.CACHE_HIT
                chosen = min((w for w in candidates if match[w.address] == top), key=lambda w: (_load(w)[:2], size(w), w.address))
            else:
                reason = RouteReason.MISS
                chosen = min(candidates, key=lambda w: (_load(w)[:2], size(w), self._last_miss(w.address), w.address))
        tree = self._tree(chosen.address)
        if reason is RouteReason.MISS:
            tree.last_miss = next(self._clock)
        tree.cache.insert(ns, key, None)
        self._bound(chosen.address, chosen.load)
        self.last_reason = reason
        self.last_match = match[chosen.address]
        self.decisions[reason] += 1
        return chosen

    @staticmethod
    def namespace(request: ValidatedRequest) -> Hashable:
        return (request.model, request.tenant_id, request.cache_salt)

    # ------------------------------------------------------------- pool events
    def worker_load(
        self, worker: WorkerHandle, previous: worker_pb2.GetLoadResponse | None, restarted: bool
    ) -> None:
        """A probe's GetLoad report: correct the approximation."""
        tree = self.trees.get(worker.address)
        if tree is None:
            return
        load = worker.load
        if restarted:
            del self.trees[worker.address]  # a new process: its cache is empty
            return
        if load is None:
            return
        evicted = previous is not None and load.evictions_total > previous.evictions_total
        dropped = previous is not None and load.kv_used * 2 < previous.kv_used  # lost over half (e.g. a flush)
        excess = tree.cache.total_tokens - load.kv_used
        if (evicted or dropped) and excess > 0:
            # It holds fewer tokens than we think it caches: drop our LRU end
            # down to what it reports holding.
            tree.cache.evict(excess)
        self._bound(worker.address, load)

    def worker_removed(self, worker: WorkerHandle) -> None:
        self.trees.pop(worker.address, None)

    # ------------------------------------------------------------- internals
    def _tree(self, address: str) -> _Tree:
        tree = self.trees.get(address)
        if tree is None:
            tree = self.trees[address] = _Tree()
        return tree

    def _last_miss(self, address: str) -> int:
        tree = self.trees.get(address)
        return tree.last_miss if tree else 0

    def _match(self, address: str, ns: Hashable, key: Sequence[int]) -> int:
        tree = self.trees.get(address)
        return tree.cache.match_prefix(ns, key).length if tree and key else 0

    def _bound(self, address: str, load: worker_pb2.GetLoadResponse | None) -> None:
        """Evict the tree down to the worker's KV size."""
        tree = self.trees.get(address)
        if tree is None:
            return
        limit = self.tree_tokens
        if load is not None and load.kv_used + load.kv_free > 0:
            limit = load.kv_used + load.kv_free
        excess = tree.cache.total_tokens - limit
        if excess > 0:
            tree.cache.evict(excess + limit // 16)  # some slack: not one heap build per request


def create_router(policy: RoutingPolicy | str, **kwargs) -> Router:
    """The router for ``policy``; ``kwargs`` go to CacheAwareRouter
    (cache_threshold, balance_abs_threshold, balance_rel_threshold,
    tree_tokens) and are ignored by the others."""
    policy = RoutingPolicy(policy)
    if policy is RoutingPolicy.ROUND_ROBIN:
        return RoundRobinRouter()
    if policy is RoutingPolicy.CACHE_AWARE:
        return CacheAwareRouter(**kwargs)
    return LeastLoadRouter()

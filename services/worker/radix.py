"""A radix tree over token ids whose nodes own KV cells (RadixAttention).

Every node is an edge of token ids starting at a depth (its tokens' KV
positions) and carries a ``value``: an opaque handle to the cells that hold
those tokens' KV (for llama.cpp, the sequence id whose cells at positions
``[start, end)`` are this node's). The tree knows nothing of an engine:
callbacks tell the owner when a node's cells may be freed (``on_evict``) and
when a value owns no node any more (``on_value_free``), so tests run with
simulated cells.

* ``match_prefix`` finds the longest cached prefix (splitting an edge so the
  match ends on a node) and refreshes its access time;
* ``insert`` adds a finished sequence's tokens, returning how many were
  already cached (the owner frees its duplicate cells for those);
* ``lock``/``unlock`` pin a node and its ancestors while a request uses
  them: locked nodes are never evicted; roots are pinned;
* ``evict`` frees unlocked leaves in policy order until enough tokens are
  freed; a parent left childless becomes evictable in turn.

Keys are namespaced (model, tenant, cache salt): each namespace has its own
root, so two tenants never share a node.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol


@dataclasses.dataclass(slots=True, eq=False)
class Node:
    """An edge of the tree."""

    key: tuple[int, ...]  # token ids of this edge
    start: int  # depth of key[0] = KV position of its first token
    value: Any  # handle to the cells holding key's KV (None on roots)
    parent: Node | None = None  # None on roots
    children: dict[int, Node] = dataclasses.field(default_factory=dict)  # first token -> child
    lock_ref: int = 0  # requests using this node (or a descendant)
    last_access: int = 0  # logical clock of the last match/insert
    hits: int = 0  # matches that used this node

    @property
    def end(self) -> int:
        return self.start + len(self.key)

    def path(self) -> list[Node]:
        """Nodes from the top of the tree down to this one (roots excluded)."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    """The longest cached prefix of a key."""

    node: Node  # last node of the match (the namespace root if nothing matched)
    length: int  # matched tokens


class EvictionPolicy(str, enum.Enum):
    LRU = "lru"  # least recently used leaf first
    LFU = "lfu"  # least often matched leaf first (then least recent)


class _Policy(Protocol):
    def priority(self, node: Node) -> tuple: ...


class _LRU:
    def priority(self, node: Node) -> tuple:
        return (node.last_access,)


class _LFU:
    def priority(self, node: Node) -> tuple:
        return (node.hits, node.last_access)


def _policy(policy: EvictionPolicy | str) -> _Policy:
    return _LFU() if EvictionPolicy(policy) is EvictionPolicy.LFU else _LRU()


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    """The tree plus token accounting."""

    def __init__(
        self,
        *,
        on_evict: Callable[[Any, int, int], None] = lambda value, start, end: None,
        on_value_free: Callable[[Any], None] = lambda value: None,
        policy: EvictionPolicy | str = EvictionPolicy.LRU,
    ) -> None:
        self._on_evict = on_evict
        self._on_value_free = on_value_free
        self._policy = _policy(policy)
        self._roots: dict[Hashable, Node] = {}
        self._clock = itertools.count(1)
        self._value_refs: dict[Any, int] = {}
        self.total_tokens = 0  # tokens held by the tree
        self.locked_tokens = 0  # of which pinned by running requests
        self.evicted_tokens = 0  # tokens evicted since start
        self.evictions = 0  # nodes evicted since start

    # ------------------------------------------------------------- queries
    @property
    def evictable_tokens(self) -> int:
        return self.total_tokens - self.locked_tokens

    def root(self, namespace: Hashable) -> Node:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = Node(key=(), start=0, value=None, lock_ref=1)  # roots are pinned
        return root

    def match_prefix(self, namespace: Hashable, key: Sequence[int]) -> Match:
        """Longest cached prefix of ``key`` in ``namespace``."""
        node = self.root(namespace)
        now = next(self._clock)
        depth = 0
        while depth < len(key) and (child := self._descend(node, key, depth, now)) is not None:
            child.hits += 1
            depth += len(child.key)
            node = child
        return Match(node, depth)

    # ------------------------------------------------------------- updates
    def insert(self, namespace: Hashable, key: Sequence[int], value: Any) -> int:
        """Cache ``key``; the part not yet cached becomes a node owning
        ``value``. Returns the number of leading tokens already cached (whose
        duplicate cells the caller should free)."""
        node = self.root(namespace)
        now = next(self._clock)
        depth = 0
        while depth < len(key):
            child = self._descend(node, key, depth, now)
            if child is None:
                leaf = Node(key=tuple(key[depth:]), start=depth, value=value, parent=node, last_access=now)
                node.children[key[depth]] = leaf
                self.total_tokens += len(leaf.key)
                self._value_refs[value] = self._value_refs.get(value, 0) + 1
                return depth
            depth += len(child.key)
            node = child
        return depth

    def lock(self, node: Node) -> None:
        """Pin ``node`` and its ancestors."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self.locked_tokens += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        if node.parent is not None and node.lock_ref <= 0:
            raise RuntimeError("radix node unlocked more often than locked")
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref < 0:
                raise RuntimeError("radix node unlocked more often than locked")
            if node.lock_ref == 0:
                self.locked_tokens -= len(node.key)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Evict unlocked leaves in policy order until at least
        ``num_tokens`` tokens are freed (or nothing is evictable)."""
        heap = [(self._policy.priority(leaf), id(leaf), leaf) for leaf in self._leaves() if leaf.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            freed += self._remove(leaf)
            if parent is not None and parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (self._policy.priority(parent), id(parent), parent))
        return freed

    def flush(self) -> int:
        """Evict everything not in use; returns the tokens freed."""
        return self.evict(self.total_tokens + 1)

    # ------------------------------------------------------------- internals
    def _descend(self, node: Node, key: Sequence[int], depth: int, now: int) -> Node | None:
        """The child of ``node`` matching ``key[depth:]``, split so the whole
        edge matches; None when no child starts with ``key[depth]``."""
        child = node.children.get(key[depth])
        if child is None:
            return None
        n = _common(child.key, key[depth:])
        if n < len(child.key):
            child = self._split(child, n)
        child.last_access = now
        return child

    def _split(self, node: Node, at: int) -> Node:
        """Split ``node`` after ``at`` tokens; returns the new upper part
        (same value: the cells do not move)."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.key)
        upper = Node(
            key=node.key[:at], start=node.start, value=node.value, parent=parent,
            lock_ref=node.lock_ref, last_access=node.last_access, hits=node.hits,
        )
        parent.children[node.key[0]] = upper
        node.key = node.key[at:]
        node.start += at
        node.parent = upper
        upper.children[node.key[0]] = node
        self._value_refs[node.value] = self._value_refs.get(node.value, 0) + 1
        return upper

    def _remove(self, leaf: Node) -> int:
        parent = leaf.parent
        assert parent is not None and not leaf.children and leaf.lock_ref == 0
        del parent.children[leaf.key[0]]
        leaf.parent = None
        n = len(leaf.key)
        self.total_tokens -= n
        self.evicted_tokens += n
        self.evictions += 1
        self._on_evict(leaf.value, leaf.start, leaf.end)
        refs = self._value_refs[leaf.value] - 1
        if refs:
            self._value_refs[leaf.value] = refs
        else:
            del self._value_refs[leaf.value]
            self._on_value_free(leaf.value)
        return n

    def _leaves(self) -> list[Node]:
        return [node for node in self.nodes() if not node.children]

    def nodes(self) -> list[Node]:
        """Every non-root node (for checks and tests)."""
        out: list[Node] = []
        stack = [child for root in self._roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def values_in_use(self) -> dict[Any, int]:
        """value -> number of nodes owning it."""
        return dict(self._value_refs)

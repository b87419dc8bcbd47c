"""The radix prefix tree on its own, with simulated KV cells (no model).

``Cells`` plays llama.cpp: every value (a holder sequence id) owns a set of
KV positions; ``on_evict(value, start, end)`` drops ``[start, end)`` from it
and ``on_value_free(value)`` returns the id. Example tests pin the documented
behaviour; the property tests drive random operation sequences and check the
tree's invariants after every step.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from llmfabric.worker.radix import EvictionPolicy, Match, Node, RadixCache

NS = ("model", "", "")
OTHER = ("model", "tenant-b", "")


class Cells:
    """Simulated KV cells: value -> positions it holds, plus a callback log."""

    def __init__(self) -> None:
        self.alive: dict[int, set[int]] = {}
        self.evicted: list[tuple[int, int, int]] = []  # (value, start, end) in call order
        self.freed: list[int] = []  # values passed to on_value_free

    def own(self, value: int, start: int, end: int) -> None:
        self.alive.setdefault(value, set()).update(range(start, end))

    def on_evict(self, value: int, start: int, end: int) -> None:
        assert start < end, (value, start, end)
        held = self.alive.get(value, set())
        missing = set(range(start, end)) - held
        assert not missing, f"value {value} evicted positions it does not hold: {sorted(missing)}"
        held.difference_update(range(start, end))
        self.evicted.append((value, start, end))

    def on_value_free(self, value: int) -> None:
        self.freed.append(value)


def make_tree(policy: EvictionPolicy | str = EvictionPolicy.LRU) -> tuple[RadixCache, Cells]:
    cells = Cells()
    return RadixCache(on_evict=cells.on_evict, on_value_free=cells.on_value_free, policy=policy), cells


def insert(tree: RadixCache, cells: Cells, key, value: int, ns=NS) -> int:
    """Insert like SequenceSlots.release: the value keeps only the uncached part."""
    cached = tree.insert(ns, key, value)
    if cached < len(key):
        cells.own(value, cached, len(key))
    return cached


def edges(tree: RadixCache, ns=NS) -> dict[tuple[int, ...], tuple[int, int, object]]:
    """Full path key of every node -> (start, end, value)."""
    out = {}
    for node in tree.nodes():
        path = node.path()
        if tree.root(ns) is not _root_of(node):
            continue
        out[tuple(t for n in path for t in n.key)] = (node.start, node.end, node.value)
    return out


def _root_of(node: Node) -> Node:
    while node.parent is not None:
        node = node.parent
    return node


def check_invariants(tree: RadixCache) -> None:
    nodes = tree.nodes()
    assert tree.total_tokens == sum(len(n.key) for n in nodes)
    assert tree.locked_tokens == sum(len(n.key) for n in nodes if n.lock_ref > 0)
    assert 0 <= tree.locked_tokens <= tree.total_tokens
    refs: dict[object, int] = {}
    for n in nodes:
        assert n.key, "empty edge"
        assert n.parent is not None
        parent_end = 0 if n.parent.parent is None else n.parent.end
        assert n.start == parent_end, (n.key, n.start, parent_end)
        assert n.parent.children.get(n.key[0]) is n, "children are keyed by their first token"
        assert n.lock_ref >= 0
        assert n.parent.parent is None or n.parent.lock_ref >= n.lock_ref, "a lock pins every ancestor"
        refs[n.value] = refs.get(n.value, 0) + 1
    assert tree.values_in_use() == refs


# ------------------------------------------------------------------ insert / match


def test_empty_tree_matches_nothing():
    tree, _ = make_tree()
    m = tree.match_prefix(NS, (1, 2, 3))
    assert isinstance(m, Match)
    assert m.length == 0
    assert m.node is tree.root(NS)
    assert m.node.path() == []
    assert tree.match_prefix(NS, ()).length == 0
    assert tree.total_tokens == 0 and tree.nodes() == []


def test_insert_into_empty_tree_then_exact_match():
    tree, cells = make_tree()
    assert insert(tree, cells, (1, 2, 3), value=7) == 0
    assert tree.total_tokens == 3
    m = tree.match_prefix(NS, (1, 2, 3))
    assert m.length == 3
    assert m.node.key == (1, 2, 3) and m.node.start == 0 and m.node.end == 3 and m.node.value == 7
    assert [n.key for n in m.node.path()] == [(1, 2, 3)]
    check_invariants(tree)


def test_match_longer_key_stops_at_the_cached_end():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3), value=7)
    m = tree.match_prefix(NS, (1, 2, 3, 4, 5))
    assert m.length == 3 and m.node.key == (1, 2, 3)


def test_no_match_on_a_different_first_token():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3), value=7)
    m = tree.match_prefix(NS, (2, 2, 3))
    assert m.length == 0 and m.node is tree.root(NS)
    assert len(tree.nodes()) == 1  # nothing split


def test_partial_match_splits_the_edge_and_keeps_the_value_on_both_halves():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3, 4, 5), value=7)
    m = tree.match_prefix(NS, (1, 2, 9))
    assert m.length == 2
    upper = m.node
    assert upper.key == (1, 2) and upper.start == 0 and upper.end == 2 and upper.value == 7
    (lower,) = upper.children.values()
    assert lower.key == (3, 4, 5) and lower.start == 2 and lower.end == 5 and lower.value == 7
    assert lower.parent is upper and upper.children == {3: lower}
    assert tree.total_tokens == 5
    assert tree.values_in_use() == {7: 2}
    check_invariants(tree)
    # the full key still matches through both halves
    assert tree.match_prefix(NS, (1, 2, 3, 4, 5)).length == 5


def test_match_shorter_than_an_edge_splits_it():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3, 4), value=7)
    m = tree.match_prefix(NS, (1, 2, 3))
    assert m.length == 3 and m.node.key == (1, 2, 3) and m.node.end == 3
    assert [c.key for c in m.node.children.values()] == [(4,)]
    check_invariants(tree)


def test_insert_splits_the_edge_where_keys_diverge():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3, 4), value=1)
    assert insert(tree, cells, (1, 2, 5, 6, 7), value=2) == 2  # (1, 2) was cached
    assert edges(tree) == {
        (1, 2): (0, 2, 1),
        (1, 2, 3, 4): (2, 4, 1),
        (1, 2, 5, 6, 7): (2, 5, 2),
    }
    assert tree.total_tokens == 4 + 3
    assert tree.values_in_use() == {1: 2, 2: 1}
    check_invariants(tree)


def test_insert_returns_the_already_cached_length():
    tree, cells = make_tree()
    assert insert(tree, cells, (1, 2, 3), value=1) == 0
    assert insert(tree, cells, (1, 2, 3, 4, 5), value=2) == 3  # extends the edge with a child
    assert insert(tree, cells, (1, 2), value=3) == 2  # a prefix of what is cached: all cached
    assert insert(tree, cells, (1, 2, 3, 4, 6), value=4) == 4  # splits (4, 5)
    assert insert(tree, cells, (9,), value=5) == 0
    assert tree.values_in_use() == {1: 2, 2: 2, 4: 1, 5: 1}  # value 3 got no node
    assert tree.total_tokens == 7
    check_invariants(tree)


def test_duplicate_insert_adds_nothing():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3), value=1)
    before = (tree.total_tokens, len(tree.nodes()), tree.values_in_use())
    assert tree.insert(NS, (1, 2, 3), 2) == 3
    assert (tree.total_tokens, len(tree.nodes()), tree.values_in_use()) == before
    assert 2 not in tree.values_in_use()


def test_insert_empty_key_adds_nothing():
    tree, _ = make_tree()
    assert tree.insert(NS, (), 1) == 0
    assert tree.nodes() == [] and tree.values_in_use() == {}


# ------------------------------------------------------------------ namespaces


def test_namespaces_never_share_nodes():
    tree, cells = make_tree()
    assert insert(tree, cells, (1, 2, 3), value=1, ns=NS) == 0
    assert insert(tree, cells, (1, 2, 3), value=2, ns=OTHER) == 0  # nothing cached in OTHER yet
    assert tree.total_tokens == 6
    a, b = tree.match_prefix(NS, (1, 2, 3)), tree.match_prefix(OTHER, (1, 2, 3))
    assert a.node is not b.node
    assert a.node.value == 1 and b.node.value == 2
    assert _root_of(a.node) is tree.root(NS) and _root_of(b.node) is tree.root(OTHER)
    check_invariants(tree)


def test_a_match_in_one_namespace_never_returns_the_others_nodes():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3, 4), value=1, ns=NS)
    m = tree.match_prefix(OTHER, (1, 2, 3, 4))
    assert m.length == 0 and m.node is tree.root(OTHER)
    assert tree.match_prefix(("other-model", "", ""), (1, 2)).length == 0
    assert tree.match_prefix(("model", "", "salt"), (1, 2)).length == 0
    assert len(tree.nodes()) == 1  # OTHER's lookups split nothing in NS


# ------------------------------------------------------------------ lock / unlock


def test_lock_and_unlock_refcount_the_whole_path():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3, 4), value=1)
    insert(tree, cells, (1, 2, 5, 6), value=2)
    leaf = tree.match_prefix(NS, (1, 2, 3, 4)).node
    upper = leaf.parent
    assert upper.key == (1, 2)

    tree.lock(leaf)
    assert (upper.lock_ref, leaf.lock_ref) == (1, 1)
    assert tree.locked_tokens == 4
    assert tree.evictable_tokens == 2
    tree.lock(upper)  # a second request using only the shared part
    assert (upper.lock_ref, leaf.lock_ref) == (2, 1)
    assert tree.locked_tokens == 4  # counted once per node

    tree.unlock(leaf)
    assert (upper.lock_ref, leaf.lock_ref) == (1, 0)
    assert tree.locked_tokens == 2
    tree.unlock(upper)
    assert upper.lock_ref == 0 and tree.locked_tokens == 0
    assert tree.root(NS).lock_ref == 1  # the root stays pinned
    check_invariants(tree)


def test_locking_the_root_is_harmless():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2), value=1)
    root = tree.match_prefix(NS, (7,)).node
    tree.lock(root)
    tree.unlock(root)
    assert root.lock_ref == 1 and tree.locked_tokens == 0


def test_split_of_a_locked_edge_keeps_both_halves_locked():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3, 4), value=1)
    node = tree.match_prefix(NS, (1, 2, 3, 4)).node
    tree.lock(node)
    upper = tree.match_prefix(NS, (1, 2, 9)).node  # splits the locked edge
    assert upper.lock_ref == 1 and node.lock_ref == 1 and node.parent is upper
    assert tree.locked_tokens == 4
    check_invariants(tree)
    tree.unlock(node)  # the original handle unlocks both halves
    assert upper.lock_ref == 0 and tree.locked_tokens == 0
    check_invariants(tree)


def test_unlock_below_zero_raises():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2), value=1)
    node = tree.match_prefix(NS, (1, 2)).node
    tree.lock(node)
    tree.unlock(node)
    with pytest.raises(RuntimeError, match="unlocked more often"):
        tree.unlock(node)


def test_a_failed_unlock_leaves_the_tree_unchanged():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2), value=1)
    node = tree.match_prefix(NS, (1, 2)).node
    with pytest.raises(RuntimeError):
        tree.unlock(node)
    tree.lock(node)  # a request now really uses it
    assert tree.locked_tokens == 2
    assert tree.evict(10) == 0  # must stay pinned


# ------------------------------------------------------------------ evict / flush


def test_evict_never_removes_locked_nodes_or_roots():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3), value=1)
    insert(tree, cells, (4, 5), value=2)
    locked = tree.match_prefix(NS, (1, 2, 3)).node
    tree.lock(locked)
    assert tree.evict(100) == 2  # only (4, 5)
    assert cells.evicted == [(2, 0, 2)]
    assert [n.key for n in tree.nodes()] == [(1, 2, 3)]
    assert cells.alive[1] == {0, 1, 2}
    assert tree.evict(100) == 0
    assert tree.root(NS).lock_ref == 1 and NS in tree._roots
    tree.unlock(locked)
    assert tree.evict(1) == 3
    assert tree.nodes() == [] and tree.total_tokens == 0
    check_invariants(tree)


def test_evict_takes_lru_leaves_first():
    tree, cells = make_tree()
    insert(tree, cells, (1, 1), value=1)
    insert(tree, cells, (2, 2, 2), value=2)
    insert(tree, cells, (3,), value=3)
    tree.match_prefix(NS, (1, 1))  # value 1 is now the most recent
    assert tree.evict(1) == 3  # (2, 2, 2): least recently used
    assert tree.evict(1) == 1  # then (3,)
    assert tree.evict(1) == 2  # then (1, 1)
    assert [v for v, _, _ in cells.evicted] == [2, 3, 1]
    assert cells.freed == [2, 3, 1]


def test_evict_stops_once_enough_tokens_are_freed():
    tree, cells = make_tree()
    for v, key in enumerate([(1, 1, 1), (2, 2, 2), (3, 3, 3)]):
        insert(tree, cells, key, value=v)
    assert tree.evict(4) == 6  # whole leaves: two of them
    assert tree.total_tokens == 3
    assert tree.evict(0) == 0 and tree.total_tokens == 3
    assert tree.evicted_tokens == 6 and tree.evictions == 2


def test_lfu_policy_evicts_the_least_matched_leaf_first():
    def scenario(policy):
        tree, cells = make_tree(policy)
        insert(tree, cells, (1,), value=1)
        insert(tree, cells, (2,), value=2)
        tree.match_prefix(NS, (1,))
        tree.match_prefix(NS, (1,))
        tree.match_prefix(NS, (2,))  # (2,) is more recent, (1,) more frequent
        tree.evict(1)
        return cells.evicted[0][0]

    assert scenario(EvictionPolicy.LRU) == 1
    assert scenario(EvictionPolicy.LFU) == 2
    assert scenario("lfu") == 2


def test_lfu_ties_fall_back_to_lru():
    tree, cells = make_tree(EvictionPolicy.LFU)
    insert(tree, cells, (1,), value=1)
    insert(tree, cells, (2,), value=2)
    tree.match_prefix(NS, (2,))
    tree.match_prefix(NS, (1,))  # same hit count; (2,) older
    tree.evict(1)
    assert cells.evicted == [(2, 0, 1)]


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError):
        RadixCache(policy="fifo")


def test_eviction_cascades_to_parents_left_childless():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3), value=1)
    insert(tree, cells, (1, 2, 4), value=2)  # splits: (1, 2) [value 1] -> (3,) [1], (4,) [2]
    insert(tree, cells, (9, 9), value=3)
    tree.match_prefix(NS, (9, 9))  # (9, 9) is the most recent
    assert tree.evict(3) == 4  # both leaves under (1, 2) (2 tokens), then (1, 2) itself
    assert sorted(cells.evicted) == [(1, 0, 2), (1, 2, 3), (2, 2, 3)]
    assert cells.evicted[-1] == (1, 0, 2)  # the parent goes after its children
    assert [n.key for n in tree.nodes()] == [(9, 9)]
    assert cells.alive[1] == set() and cells.alive[2] == set()
    assert sorted(cells.freed) == [1, 2]
    check_invariants(tree)


def test_a_parent_on_a_locked_path_is_not_cascaded():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3), value=1)
    upper = tree.match_prefix(NS, (1, 2)).node  # splits (1, 2) | (3,)
    tree.lock(upper)
    assert tree.evict(100) == 1  # (3,) only
    assert [n.key for n in tree.nodes()] == [(1, 2)]
    assert cells.alive[1] == {0, 1}
    assert cells.freed == []  # value 1 still owns (1, 2)


def test_on_value_free_fires_only_when_the_last_node_of_a_value_goes():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3, 4), value=1)
    tree.match_prefix(NS, (1, 2))  # value 1 now owns two nodes
    insert(tree, cells, (5,), value=2)
    tree.match_prefix(NS, (5,))
    assert tree.values_in_use() == {1: 2, 2: 1}
    assert tree.evict(1) == 2  # (3, 4): value 1 still owns (1, 2)
    assert cells.freed == []
    assert tree.values_in_use() == {1: 1, 2: 1}
    assert tree.evict(1) == 2  # (1, 2): cascaded, value 1 owns nothing now
    assert cells.freed == [1]
    assert cells.evicted == [(1, 2, 4), (1, 0, 2)]
    assert tree.values_in_use() == {2: 1}


def test_evict_returns_freed_tokens_and_counts():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3), value=1)
    insert(tree, cells, (1, 2, 3, 4, 5), value=2)
    assert tree.evict(1) == 2  # the leaf (4, 5)
    assert tree.evictions == 1 and tree.evicted_tokens == 2
    assert tree.evict(10) == 3
    assert tree.evictions == 2 and tree.evicted_tokens == 5
    assert tree.total_tokens == 0


def test_flush_evicts_everything_unlocked_in_every_namespace():
    tree, cells = make_tree()
    insert(tree, cells, (1, 2, 3), value=1)
    insert(tree, cells, (1, 2, 4), value=2)
    insert(tree, cells, (1, 2, 3), value=3, ns=OTHER)
    insert(tree, cells, (7, 8), value=4, ns=OTHER)
    keep = tree.match_prefix(OTHER, (7, 8)).node
    tree.lock(keep)
    assert tree.flush() == 3 + 1 + 3
    assert [n.key for n in tree.nodes()] == [(7, 8)]
    assert tree.total_tokens == tree.locked_tokens == 2
    assert sorted(cells.freed) == [1, 2, 3]
    assert all(not cells.alive[v] for v in (1, 2, 3)) and cells.alive[4] == {0, 1}
    tree.unlock(keep)
    assert tree.flush() == 2
    assert tree.total_tokens == 0 and tree.values_in_use() == {}
    assert tree.flush() == 0


# ------------------------------------------------------------------ properties

TOKENS = st.integers(min_value=0, max_value=3)
KEYS = st.lists(TOKENS, min_size=1, max_size=12).map(tuple)
NAMESPACES = st.sampled_from([NS, OTHER])


class RadixMachine(RuleBasedStateMachine):
    """Random inserts, matches with locks, unlocks, evictions and flushes
    over a tiny alphabet (so keys share prefixes and edges split often)."""

    policy = EvictionPolicy.LRU
    locks = Bundle("locks")

    def __init__(self) -> None:
        super().__init__()
        self.cells = Cells()
        self.tree = RadixCache(on_evict=self.cells.on_evict, on_value_free=self._on_value_free, policy=self.policy)
        self.next_value = 0
        self.inserted: list[tuple[object, tuple[int, ...]]] = []  # keys cached whole, none of their nodes evicted
        self.held: list[tuple[Node, object, int, tuple[int, ...]]] = []  # (node, ns, length, key) locked

    def _on_value_free(self, value) -> None:
        assert value not in self.tree.values_in_use(), "freed value still owns a node"
        assert not any(n.value == value for n in self.tree.nodes())
        assert not self.cells.alive.get(value), f"value {value} freed with cells left: {self.cells.alive[value]}"
        self.cells.on_value_free(value)

    def _snapshot(self) -> dict[int, tuple[object, tuple[int, ...], int, int]]:
        """id(node) -> (namespace, full key down to its end, start, lock_ref)."""
        roots = {id(r): ns for ns, r in self.tree._roots.items()}
        return {
            id(n): (roots[id(_root_of(n))], tuple(t for p in n.path() for t in p.key), n.start, n.lock_ref)
            for n in self.tree.nodes()
        }

    def _evicting(self, op) -> int:
        """Run an eviction; check what went and forget the keys it cut."""
        before = self._snapshot()
        freed = op()
        after = self._snapshot()
        gone = [before[k] for k in before.keys() - after.keys()]
        assert all(lock_ref == 0 for _, _, _, lock_ref in gone), "a locked node was evicted"
        assert freed == sum(len(full) - start for _, full, start, _ in gone)
        assert len(self.cells.evicted) >= len(gone)

        def cut(ns, key):
            return any(ns == g_ns and len(key) > start and key[: start + 1] == full[: start + 1]
                       for g_ns, full, start, _ in gone)

        self.inserted = [(ns, key) for ns, key in self.inserted if not cut(ns, key)]
        return freed

    # rules -----------------------------------------------------------
    @rule(ns=NAMESPACES, key=KEYS)
    def insert(self, ns, key):
        value = self.next_value
        self.next_value += 1
        before = self.tree.total_tokens
        cached = self.tree.insert(ns, key, value)
        assert 0 <= cached <= len(key)
        assert self.tree.total_tokens == before + len(key) - cached
        if cached < len(key):
            self.cells.own(value, cached, len(key))
            assert self.tree.values_in_use()[value] == 1
        else:
            assert value not in self.tree.values_in_use()
        self.inserted.append((ns, key))

    @rule(target=locks, ns=NAMESPACES, key=KEYS)
    def match_and_lock(self, ns, key):
        m = self.tree.match_prefix(ns, key)
        assert 0 <= m.length <= len(key)
        path = m.node.path()
        assert tuple(t for n in path for t in n.key) == key[: m.length]
        assert (path[-1].end if path else 0) == m.length
        if m.length < len(key):  # maximal: nothing cached continues it
            assert key[m.length] not in m.node.children
        self.tree.lock(m.node)
        entry = (m.node, ns, m.length, key[: m.length])
        self.held.append(entry)
        return entry

    @rule(entry=consumes(locks))
    def unlock(self, entry):
        self.tree.unlock(entry[0])
        self.held.remove(entry)

    @rule(n=st.integers(min_value=0, max_value=30))
    def evict(self, n):
        evictable = self.tree.evictable_tokens
        freed = self._evicting(lambda: self.tree.evict(n))
        if n > 0 and evictable > 0:
            assert freed > 0
        if freed < n:
            assert self.tree.evictable_tokens == 0, "stopped early with evictable tokens left"

    @rule()
    def flush(self):
        locked = self.tree.locked_tokens
        self._evicting(self.tree.flush)
        assert self.tree.total_tokens == locked
        assert all(n.lock_ref > 0 for n in self.tree.nodes())

    # invariants -------------------------------------------------------
    @invariant()
    def structure(self):
        check_invariants(self.tree)

    @invariant()
    def simulated_cells_match_the_tree(self):
        expected: dict[int, set[int]] = {}
        for n in self.tree.nodes():
            expected.setdefault(n.value, set()).update(range(n.start, n.end))
        alive = {v: s for v, s in self.cells.alive.items() if s}
        assert alive == expected

    @invariant()
    def locked_paths_keep_their_cells(self):
        for node, ns, length, key in self.held:
            assert node.lock_ref > 0
            assert _root_of(node) is self.tree.root(ns)
            for n in node.path():
                assert self.cells.alive[n.value] >= set(range(n.start, n.end))
            assert tuple(t for n in node.path() for t in n.key) == key

    @invariant()
    def freed_values_own_nothing(self):
        assert not set(self.cells.freed) & set(self.tree.values_in_use())
        assert len(self.cells.freed) == len(set(self.cells.freed)), "a value was freed twice"

    @invariant()
    def inserted_keys_match_in_full_unless_evicted(self):
        for ns, key in self.inserted:
            assert self.tree.match_prefix(ns, key).length == len(key), (ns, key)


class LFUMachine(RadixMachine):
    policy = EvictionPolicy.LFU


_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestRadixMachine = RadixMachine.TestCase
TestRadixMachine.settings = _SETTINGS
TestLFUMachine = LFUMachine.TestCase
TestLFUMachine.settings = _SETTINGS

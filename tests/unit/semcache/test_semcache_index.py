"""Vector indexes of the semantic cache: exact, hnsw and auto behind one protocol (keys, cosine, deletions)."""

from __future__ import annotations

import numpy as np
import pytest

from llmfabric.semcache.index import AutoIndex, ExactIndex, HnswIndex, IndexKind, create_index

DIM = 32
KINDS = list(IndexKind)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, rng: np.random.Generator, dim: int = DIM, centres: int = 100) -> np.ndarray:
    c = unit(rng.standard_normal((centres, dim)))
    return unit(c[rng.integers(0, centres, n)] + rng.standard_normal((n, dim)) * 0.15)


def make(kind: IndexKind, dim: int = DIM, **params):
    if kind is IndexKind.AUTO and "threshold" not in params:
        params["threshold"] = 50  # small, so the auto cases cross it
    return create_index(kind, dim, **params)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.mark.parametrize("kind", KINDS)
def test_search_finds_each_key_with_similarity_one(kind, rng):
    ix, x = make(kind), clustered(200, rng)
    keys = [int(k) for k in rng.choice(2**40, 200, replace=False)]
    for k, v in zip(keys, x):
        ix.add(k, v)
    assert len(ix) == 200 and all(k in ix for k in keys) and -1 not in ix
    for k, v in zip(keys, x):
        (got, sim), = ix.search(v)
        assert got == k and sim == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_k_results_are_ordered_best_first_and_capped(kind, rng):
    ix, x = make(kind), clustered(120, rng)
    for k, v in enumerate(x):
        ix.add(k, v)
    q = unit(x[3] + rng.standard_normal(DIM) * 0.05)
    res = ix.search(q, k=5)
    sims = [s for _, s in res]
    assert len(res) == 5 and sims == sorted(sims, reverse=True) and res[0][0] == 3
    exact = np.sort(x @ q)[::-1][:5]
    np.testing.assert_allclose(sims, exact, atol=1e-5)
    assert len(ix.search(q, k=1000)) == 120


@pytest.mark.parametrize("kind", KINDS)
def test_remove_is_never_returned_again(kind, rng):
    ix, x = make(kind), clustered(150, rng)
    for k, v in enumerate(x):
        ix.add(k, v)
    gone = set(range(0, 150, 3))
    for k in gone:
        assert ix.remove(k) is True
    assert ix.remove(0) is False and ix.remove(10**9) is False
    assert len(ix) == 100 and 0 not in ix and 1 in ix
    for v in x:
        assert not gone & {k for k, _ in ix.search(v, k=10)}
    assert {k for k, _ in ix.search(x[0], k=150)} == set(range(150)) - gone


@pytest.mark.parametrize("kind", KINDS)
def test_add_replaces_an_existing_key(kind, rng):
    ix, x = make(kind), clustered(80, rng)
    for k, v in enumerate(x[:60]):
        ix.add(k, v)
    ix.add(5, x[70])  # same key, new vector
    assert len(ix) == 60
    assert ix.search(x[70]) == [(5, pytest.approx(1.0, abs=1e-5))]
    assert dict(ix.search(x[5], k=60))[5] == pytest.approx(float(x[70] @ x[5]), abs=1e-5)  # the old vector is gone
    ix.remove(5)
    ix.add(5, x[71])  # re-add after removal
    assert ix.search(x[71])[0] == (5, pytest.approx(1.0, abs=1e-5)) and len(ix) == 60


@pytest.mark.parametrize("kind", KINDS)
def test_empty_index_searches_to_nothing(kind, rng):
    ix = make(kind)
    assert ix.search(unit(rng.standard_normal(DIM))) == [] and len(ix) == 0
    ix.add(1, unit(rng.standard_normal(DIM)))
    ix.remove(1)
    assert ix.search(unit(rng.standard_normal(DIM)), k=3) == []


@pytest.mark.parametrize("kind", KINDS)
def test_bad_vectors_and_arguments_raise_value_error(kind, rng):
    ix = make(kind)
    with pytest.raises(ValueError, match=f"{DIM}-d"):
        ix.add(1, np.ones(DIM + 1, np.float32))
    with pytest.raises(ValueError, match=f"{DIM}-d"):
        ix.search(np.ones((1, DIM), np.float32))
    with pytest.raises(ValueError, match="non-zero"):
        ix.add(1, np.zeros(DIM, np.float32))
    with pytest.raises(ValueError, match="finite"):
        ix.add(1, np.full(DIM, np.nan, np.float32))
    with pytest.raises(ValueError, match="int64"):
        ix.add(2**63, np.ones(DIM, np.float32))
    with pytest.raises(ValueError, match="k must be"):
        ix.search(np.ones(DIM, np.float32), k=0)
    assert len(ix) == 0
    with pytest.raises(ValueError):
        create_index("annoy", DIM)
    with pytest.raises(ValueError, match="dim"):
        create_index(kind, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_keys_are_arbitrary_int64(kind, rng):
    ix, x = make(kind), clustered(6, rng)
    keys = [-(2**63), 2**63 - 1, -1, 0, 1 << 62, -12345]
    for k, v in zip(keys, x):
        ix.add(np.int64(k), v)
    for k, v in zip(keys, x):
        got, _ = ix.search(v)[0]
        assert got == k and type(got) is int
    assert ix.remove(-1) and -1 not in ix and len(ix) == 5


@pytest.mark.parametrize("kind", KINDS)
def test_unnormalised_input_gives_cosine(kind, rng):
    ix, v = make(kind), unit(rng.standard_normal(DIM))
    ix.add(9, 3.0 * v)
    assert ix.search(0.5 * v) == [(9, pytest.approx(1.0, abs=1e-5))]


def test_auto_migrates_past_threshold_and_keeps_every_key_and_recall():
    rng = np.random.default_rng(1)
    ix, x = AutoIndex(DIM, threshold=1000), clustered(3000, rng)
    keys = rng.choice(2**62, 3000, replace=False) - 2**61
    for i, (k, v) in enumerate(zip(keys, x)):
        ix.add(int(k), v)
        assert ix.kind is (IndexKind.EXACT if i < 1000 else IndexKind.HNSW)
    assert len(ix) == 3000 and all(int(k) in ix for k in keys)
    q = unit(x + rng.standard_normal(x.shape) * 0.03)
    truth = keys[np.argmax(q @ x.T, axis=1)]
    recall = np.mean([ix.search(v)[0][0] == t for v, t in zip(q, truth)])
    assert recall >= 0.95
    for k in keys[:2600]:  # shrink below threshold // 2: back to exact, same live keys
        ix.remove(int(k))
    assert ix.kind is IndexKind.EXACT and len(ix) == 400
    assert all(ix.search(v)[0][0] == k for k, v in zip(keys[2600:], x[2600:]))


def test_hnsw_churn_keeps_slots_and_capacity_bounded():
    rng = np.random.default_rng(2)
    ix = HnswIndex(DIM, capacity=256, min_compact=64)
    pool = clustered(400, rng)
    live: dict[int, int] = {}
    next_key = 0
    for step in range(4000):  # steady ~300 live entries, keys never reused
        if len(live) < 300 or rng.random() < 0.5:
            live[next_key] = int(rng.integers(0, 400))
            ix.add(next_key, pool[live[next_key]])
            next_key += 1
        else:
            k = list(live)[int(rng.integers(0, len(live)))]
            assert ix.remove(k)
            del live[k]
        assert len(ix) == len(live)
    assert ix.slots <= 2 * 300 + 64 and ix.capacity <= 2048
    dead = set(range(next_key)) - set(live)
    for k, i in list(live.items())[:100]:
        res = {key for key, _ in ix.search(pool[i], k=5)}
        assert not res & dead and res <= set(live)


def test_hnsw_compacts_after_a_big_shrink_and_stays_correct():
    rng = np.random.default_rng(3)
    ix, x = HnswIndex(DIM, capacity=64, min_compact=100), clustered(2000, rng)
    for k, v in enumerate(x):
        ix.add(k, v)
    assert ix.capacity >= 2000
    for k in range(1900):
        ix.remove(k)
    assert len(ix) == 100 and ix.slots <= 300 and ix.capacity <= 1024
    assert {k for k, _ in ix.search(x[1950], k=100)} == set(range(1900, 2000))
    assert ix.search(x[1950])[0][0] == 1950


def test_exact_capacity_shrinks_after_removal(rng):
    ix = ExactIndex(DIM)
    for k, v in enumerate(clustered(5000, rng)):
        ix.add(k, v)
    for k in range(4990):
        ix.remove(k)
    assert len(ix) == 10 and ix._keys.shape[0] <= 128
    assert sorted(k for k, _ in ix.search(np.ones(DIM, np.float32), k=20)) == list(range(4990, 5000))


def test_hnsw_search_is_complete_even_when_the_graph_cannot_reach_k_live_nodes():
    rng = np.random.default_rng(5)  # a sparse graph full of deleted nodes: hnswlib alone raises for k = len
    ix, live, next_key = HnswIndex(16, capacity=64, m=4, ef_construction=10, ef_search=4, min_compact=10**9), set(), 0
    for step in range(1500):
        if len(live) < 50 or rng.random() < 0.45:
            ix.add(next_key, rng.standard_normal(16))
            live.add(next_key)
            next_key += 1
        else:
            k = int(rng.choice(sorted(live)))
            ix.remove(k)
            live.discard(k)
        if step % 50 == 0:
            assert {k for k, _ in ix.search(rng.standard_normal(16), k=len(live))} == live

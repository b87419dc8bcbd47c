"""The answer store, its keys, its hit policy and its snapshots — in
process, with a bag-of-words stand-in for the embedding model (the store
takes vectors; the real model is tested in test_semcache_embedding.py and
through the service in test_semcache_service.py)."""

from __future__ import annotations

import numpy as np
import pytest
from fabric_testing import BagOfWords  # tests/ is on sys.path (tests/conftest.py)

from llmfabric.common.v1 import common_pb2
from llmfabric.runtime.errors import InvalidArgument
from llmfabric.semcache import persist
from llmfabric.semcache.keys import deterministic, key_parts, normalize
from llmfabric.semcache.policy import HitPolicy, compatible
from llmfabric.semcache.store import AnswerStore
from llmfabric.semcache.v1 import semcache_pb2

DIM = 64


def bow(text: str) -> np.ndarray:
    return BagOfWords(DIM).embed([text])[0]


def key(question: str = "How do I reset my password?", *, model="m", tenant="t", salt="", system="Be brief.",
        temperature=0.0, max_tokens=64, history=(), prompt=False) -> semcache_pb2.CacheKey:
    sp = common_pb2.SamplingParams(temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_tokens,
                                   repetition_penalty=1.0)
    k = semcache_pb2.CacheKey(model=model, tenant=common_pb2.Tenant(id=tenant, cache_salt=salt), sampling=sp)
    if prompt:
        k.prompt = question
    else:
        k.messages.extend([common_pb2.ChatMessage(role="system", content=system), *history,
                           common_pb2.ChatMessage(role="user", content=question)])
    return k


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(clock):
    return AnswerStore(dim=DIM, policy=HitPolicy(0.8), clock=clock, default_ttl=100.0)


def put(store, k, answer: str = "answer", ttl=None):
    parts = key_parts(k)
    return store.put(parts, bow(parts.query), answer.encode(), ttl)


def lookup(store, k, threshold=None):
    parts = key_parts(k)
    return store.lookup_exact(parts) or store.lookup_semantic(parts, bow(parts.query), threshold)


# ------------------------------------------------------------------ keys


def test_normalisation_and_exact_key_ignore_spacing_only():
    assert normalize("  How\tdo  I\n reset ") == "How do I reset"
    assert key_parts(key("How do I  reset my password?")).exact == key_parts(key(" How do I reset my password? ")).exact
    assert key_parts(key("How do I reset my password?")).exact != key_parts(key("How do I reset my password")).exact


@pytest.mark.parametrize("other", [
    key(model="m2"), key(tenant="t2"), key(salt="s"), key(system="Be verbose."), key(temperature=0.5),
    key(max_tokens=65), key(prompt=True),
    key(history=[common_pb2.ChatMessage(role="user", content="hi"), common_pb2.ChatMessage(role="assistant", content="yo")]),
])
def test_everything_but_the_question_is_in_the_namespace(other):
    assert key_parts(other).namespace != key_parts(key()).namespace


@pytest.mark.parametrize("k, field", [
    (semcache_pb2.CacheKey(messages=[common_pb2.ChatMessage(role="user", content="q")]), "key.model"),
    (semcache_pb2.CacheKey(model="m"), "key.messages"),
    (semcache_pb2.CacheKey(model="m", messages=[common_pb2.ChatMessage(role="robot", content="q")]), "key.messages[0].role"),
    (semcache_pb2.CacheKey(model="m", messages=[common_pb2.ChatMessage(role="assistant", content="q")]), "key.messages"),
    (semcache_pb2.CacheKey(model="m", messages=[common_pb2.ChatMessage(role="user", content="  ")]), "key.messages"),
    (semcache_pb2.CacheKey(model="m", prompt="p", messages=[common_pb2.ChatMessage(role="user", content="q")]), "key.prompt"),
])
def test_bad_keys_name_the_field(k, field):
    with pytest.raises(InvalidArgument) as exc:
        key_parts(k)
    assert exc.value.field == field


def test_deterministic_means_greedy_or_seeded():
    assert deterministic(common_pb2.SamplingParams(temperature=0.0))
    assert deterministic(common_pb2.SamplingParams(temperature=0.7, seed=3))
    assert not deterministic(common_pb2.SamplingParams(temperature=0.7))
    assert not deterministic(common_pb2.SamplingParams())


# ------------------------------------------------------------------ policy


@pytest.mark.parametrize("a, b", [
    ("What is the capital of Austria?", "What is the capital of Australia?"),
    ("Convert 5 miles to km", "Convert 50 miles to km"),
    ("Which foods are safe for dogs?", "Which foods are not safe for dogs?"),
    ("How do I enable dark mode?", "How do I disable dark mode?"),
    ("Convert USD to EUR", "Convert EUR to USD"),
    ("Flights from Paris to Rome", "Flights from Rome to Paris"),
    ("How do I create a virtual environment in Python?", "How do I activate a virtual environment in Python?"),
    ("What is the boiling point of water in Celsius?", "What is the freezing point of water in Celsius?"),
])
def test_guard_rejects_answer_flipping_differences(a, b):
    assert not compatible(a, b) and not compatible(b, a)


@pytest.mark.parametrize("a, b", [
    ("what is the capital of france", "What is France's capital city?"),
    ("How do I reset my password?", "I forgot my password. How can I reset it?"),
    ("How do I sort a list in Python?", "what's the way to sort a list in python"),
    ("How do I cancel my subscription?", "how do i cance my subscription"),  # a typo is not an edit
])
def test_guard_accepts_paraphrases(a, b):
    assert compatible(a, b)


def test_policy_threshold_and_guard_switch():
    p = HitPolicy(0.9)
    assert not p.accepts("a b", "a b", 0.89) and p.accepts("a b", "a b", 0.9)
    assert p.accepts("a b", "a b", 0.85, threshold=0.8)  # per-request threshold wins
    assert not p.accepts("5 apples", "6 apples", 0.99)
    assert HitPolicy(0.9, guard=False).accepts("5 apples", "6 apples", 0.99)


# ------------------------------------------------------------------ store


def test_exact_then_semantic_hit_and_miss(store):
    e = put(store, key("How do I reset my password?"))
    exact = lookup(store, key("How do I reset my  password?"))
    assert exact.exact and exact.similarity == 1.0 and exact.entry is e
    sem = lookup(store, key("How can I reset my password?"))
    assert sem is not None and not sem.exact and 0.8 <= sem.similarity < 1.0
    assert lookup(store, key("What are your opening hours?")) is None
    c = store.counters
    assert (c.exact_hits, c.semantic_hits, c.misses) == (1, 1, 1)


@pytest.mark.parametrize("other", [key(tenant="intruder"), key(model="m2"), key(system="Answer in French."), key(salt="x")])
def test_namespaces_never_share(store, other):
    put(store, key())
    q = other.messages[-1].content
    assert q == key().messages[-1].content
    assert lookup(store, other) is None


def test_replacing_an_exact_key_keeps_one_entry(store):
    put(store, key(), "old")
    put(store, key(), "new")
    assert len(store) == 1 and lookup(store, key()).entry.payload == b"new"


def test_ttl_expiry_on_lookup_and_sweep(store, clock):
    put(store, key("q one"), ttl=10)
    put(store, key("q two"))  # default ttl 100
    clock.t += 11
    assert lookup(store, key("q one")) is None
    assert len(store) == 1 and store.counters.expirations == 1
    clock.t += 100
    assert store.expire() == 1 and len(store) == 0 and store.bytes == 0 and store.namespaces == 0


def test_entry_bound_evicts_least_recently_used(clock):
    s = AnswerStore(dim=DIM, policy=HitPolicy(0.99), clock=clock, max_entries=3)
    for i in range(3):
        put(s, key(f"question number {i} about zebras"))
    assert lookup(s, key("question number 0 about zebras")) is not None  # 0 is now recent
    put(s, key("question number 3 about zebras"))
    assert len(s) == 3 and s.counters.evictions == 1
    assert lookup(s, key("question number 1 about zebras")) is None  # the LRU one went
    assert lookup(s, key("question number 0 about zebras")) is not None


def test_memory_bound_counts_bytes(clock):
    s = AnswerStore(dim=DIM, policy=HitPolicy(0.99), clock=clock, max_bytes=20_000)
    for i in range(50):
        put(s, key(f"q{i}"), "x" * 1000)
    assert s.bytes <= 20_000 and s.counters.evictions > 0
    assert s.bytes == sum(e.size for e in s.entries())


def test_invalidate_by_id_namespace_and_age(store, clock):
    a = put(store, key("alpha question"))
    put(store, key("beta question", tenant="t2"))
    clock.t += 50
    put(store, key("gamma question", model="m2"))
    assert store.invalidate(entry_id=a.id) == 1 and store.invalidate(entry_id=a.id) == 0
    assert store.invalidate(older_than=40) == 1  # beta
    assert store.invalidate(model="m2", tenant="t") == 1 and len(store) == 0


# ------------------------------------------------------------------ snapshots


def test_snapshot_round_trip_keeps_entries_and_lru_order(store, clock, tmp_path):
    for q in ("first q", "second q", "third q"):
        put(store, key(q), q.upper())
    lookup(store, key("first q"))  # first becomes most recent
    path = tmp_path / "snap.bin"
    persist.save(store.entries(), path)
    restored = list(persist.load(path, clock()))
    assert [e.query for e in restored] == ["second q", "third q", "first q"]
    assert [e.payload for e in restored] == [b"SECOND Q", b"THIRD Q", b"FIRST Q"]
    assert all(np.allclose(a.vector, b.vector) for a, b in zip(restored, store.entries()))


def test_snapshot_skips_expired_and_survives_a_damaged_tail(store, clock, tmp_path):
    put(store, key("short lived"), ttl=5)
    put(store, key("long lived one"))
    put(store, key("long lived two"))
    path = tmp_path / "snap.bin"
    persist.save(store.entries(), path)
    assert [e.query for e in persist.load(path, clock() + 10)] == ["long lived one", "long lived two"]
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # torn last record
    assert [e.query for e in persist.load(path, clock())] == ["short lived", "long lived one"]
    path.write_bytes(b"garbage")
    assert list(persist.load(path, clock())) == []
    assert list(persist.load(tmp_path / "missing.bin", clock())) == []


def test_a_failed_write_leaves_the_previous_snapshot(store, tmp_path, monkeypatch):
    put(store, key("kept"))
    path = tmp_path / "snap.bin"
    persist.save(store.entries(), path)
    before = path.read_bytes()
    put(store, key("new"))
    monkeypatch.setattr(persist.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        persist.save(store.entries(), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["snap.bin"]

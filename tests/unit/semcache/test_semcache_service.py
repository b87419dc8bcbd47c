"""The SemanticCacheService over real gRPC (bag-of-words embedder stand-in):
Lookup/Store/Invalidate/GetStats, what is never stored, bad input naming
the field, persistence across a restart, metrics."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from fabric_testing import BagOfWords  # tests/ is on sys.path (tests/conftest.py)

from llmfabric.common.v1 import common_pb2
from llmfabric.semcache.config import SemcacheConfig
from llmfabric.semcache.server import create_server
from llmfabric.semcache.v1 import semcache_pb2, semcache_pb2_grpc

DIM = 64
STOP, LENGTH, ERROR, CANCELLED = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH,
                                  common_pb2.FINISH_REASON_ERROR, common_pb2.FINISH_REASON_CANCELLED)


def key(question="How do I reset my password?", tenant="acme", temperature=0.0, seed=None, model="m"):
    sp = common_pb2.SamplingParams(temperature=temperature, max_tokens=32)
    if seed is not None:
        sp.seed = seed
    return semcache_pb2.CacheKey(model=model, tenant=common_pb2.Tenant(id=tenant), sampling=sp, messages=[
        common_pb2.ChatMessage(role="system", content="Be brief."), common_pb2.ChatMessage(role="user", content=question)])


def answer(text="Use the sign-in page.", finish=STOP):
    words = text.split(" ")
    chunks = [common_pb2.TokenChunk(token_ids=[i], text=(" " if i else "") + w) for i, w in enumerate(words)]
    chunks.append(common_pb2.TokenChunk(finish_reason=finish, usage=common_pb2.Usage(prompt_tokens=20, completion_tokens=len(words), total_tokens=20 + len(words))))
    return chunks


@pytest.fixture
async def cache(tmp_path):
    started = []

    async def start(**cfg_kw):
        cfg_kw.setdefault("snapshot_path", str(tmp_path / "snap.bin"))
        cfg = SemcacheConfig(port=0, metrics_port=0, threshold=0.8, **cfg_kw)
        svc, port = await create_server(cfg, embedder=BagOfWords(DIM))
        await svc.load()
        await svc.host.set_serving(True)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((svc, ch))
        return svc, semcache_pb2_grpc.SemanticCacheServiceStub(ch)

    async def stop(svc):
        for s, ch in list(started):
            if s is svc:
                await ch.close()
                await s.host.server.stop(0)
                await s.close()
                started.remove((s, ch))

    start.stop = stop
    yield start
    for s, ch in started:
        await ch.close()
        await s.host.server.stop(0)
        await s.close()


async def test_store_then_exact_and_semantic_hits_replay_the_chunks(cache):
    _, stub = await cache()
    assert (await stub.Lookup(semcache_pb2.LookupRequest(key=key()))).hit == semcache_pb2.HIT_KIND_UNSPECIFIED
    stored = await stub.Store(semcache_pb2.StoreRequest(key=key(), chunks=answer()))
    assert stored.stored and stored.entry_id
    exact = await stub.Lookup(semcache_pb2.LookupRequest(key=key("How do I reset my password? ")))
    assert exact.hit == semcache_pb2.HIT_KIND_EXACT and exact.similarity == 1.0 and exact.entry_id == stored.entry_id
    assert "".join(c.text for c in exact.chunks) == "Use the sign-in page." and exact.chunks[-1].finish_reason == STOP
    sem = await stub.Lookup(semcache_pb2.LookupRequest(key=key("How can I reset my password?")))
    assert sem.hit == semcache_pb2.HIT_KIND_SEMANTIC and 0.8 <= sem.similarity < 1.0
    assert sem.matched_query == "How do I reset my password?"
    strict = await stub.Lookup(semcache_pb2.LookupRequest(key=key("How can I reset my password?"), threshold=0.9999))
    assert strict.hit == semcache_pb2.HIT_KIND_UNSPECIFIED
    other = await stub.Lookup(semcache_pb2.LookupRequest(key=key("How do I reset my password?", tenant="other")))
    assert other.hit == semcache_pb2.HIT_KIND_UNSPECIFIED  # another tenant never sees it
    stats = await stub.GetStats(semcache_pb2.GetStatsRequest())
    assert (stats.entries, stats.exact_hits, stats.semantic_hits, stats.misses) == (1, 1, 1, 3)


@pytest.mark.parametrize("k, chunks, allow, reason", [
    (key(), answer(finish=ERROR), False, "FINISH_REASON_ERROR"),
    (key(), answer(finish=CANCELLED), False, "FINISH_REASON_CANCELLED"),
    (key(temperature=0.7), answer(), False, "not deterministic"),
])
async def test_never_stored(cache, k, chunks, allow, reason):
    _, stub = await cache()
    r = await stub.Store(semcache_pb2.StoreRequest(key=k, chunks=chunks, allow_nondeterministic=allow))
    assert not r.stored and reason in r.reason
    assert (await stub.GetStats(semcache_pb2.GetStatsRequest())).entries == 0


async def test_seeded_and_explicitly_allowed_answers_are_stored(cache):
    _, stub = await cache()
    assert (await stub.Store(semcache_pb2.StoreRequest(key=key(temperature=0.7, seed=1), chunks=answer()))).stored
    assert (await stub.Store(semcache_pb2.StoreRequest(key=key(temperature=0.7), chunks=answer(),
                                                       allow_nondeterministic=True))).stored


@pytest.mark.parametrize("req, field", [
    (semcache_pb2.LookupRequest(key=key(), threshold=1.5), "threshold"),
    (semcache_pb2.LookupRequest(key=semcache_pb2.CacheKey()), "key.model"),
    (semcache_pb2.StoreRequest(key=key()), "chunks"),
    (semcache_pb2.StoreRequest(key=key(), chunks=answer(), ttl_seconds=-1), "ttl_seconds"),
    (semcache_pb2.InvalidateRequest(), "entry_id"),
    (semcache_pb2.InvalidateRequest(entry_id="abc"), "entry_id"),
    (semcache_pb2.InvalidateRequest(older_than_seconds=-5), "older_than_seconds"),
])
async def test_bad_input_is_invalid_argument_naming_the_field(cache, req, field):
    _, stub = await cache()
    method = {semcache_pb2.LookupRequest: stub.Lookup, semcache_pb2.StoreRequest: stub.Store,
              semcache_pb2.InvalidateRequest: stub.Invalidate}[type(req)]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await method(req)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in exc.value.details()


async def test_invalidate_by_entry_namespace_and_age(cache):
    _, stub = await cache()
    a = await stub.Store(semcache_pb2.StoreRequest(key=key("alpha"), chunks=answer()))
    await stub.Store(semcache_pb2.StoreRequest(key=key("beta", tenant="t2"), chunks=answer()))
    await stub.Store(semcache_pb2.StoreRequest(key=key("gamma", tenant="t2", model="m2"), chunks=answer()))
    assert (await stub.Invalidate(semcache_pb2.InvalidateRequest(entry_id=a.entry_id))).removed == 1
    ns = semcache_pb2.CacheKey(model="m", tenant=common_pb2.Tenant(id="t2"))
    assert (await stub.Invalidate(semcache_pb2.InvalidateRequest(key_namespace=ns))).removed == 1
    assert (await stub.Invalidate(semcache_pb2.InvalidateRequest(older_than_seconds=3600))).removed == 0
    assert (await stub.GetStats(semcache_pb2.GetStatsRequest())).entries == 1


async def test_ttl_from_the_request(cache):
    svc, stub = await cache()
    await stub.Store(semcache_pb2.StoreRequest(key=key(), chunks=answer(), ttl_seconds=5))
    svc.servicer.store.clock = lambda: 1e12  # far in the future
    assert (await stub.Lookup(semcache_pb2.LookupRequest(key=key()))).hit == semcache_pb2.HIT_KIND_UNSPECIFIED
    assert (await stub.GetStats(semcache_pb2.GetStatsRequest())).expirations == 1


async def test_entries_survive_a_restart(cache, tmp_path):
    svc, stub = await cache()
    await stub.Store(semcache_pb2.StoreRequest(key=key(), chunks=answer("Kept across restarts.")))
    await cache.stop(svc)  # close() writes the snapshot
    assert (tmp_path / "snap.bin").exists()
    _, stub2 = await cache()
    r = await stub2.Lookup(semcache_pb2.LookupRequest(key=key()))
    assert r.hit == semcache_pb2.HIT_KIND_EXACT and "".join(c.text for c in r.chunks) == "Kept across restarts."


async def test_no_persistence_when_disabled(cache, tmp_path):
    svc, stub = await cache(snapshot_path="-")
    await stub.Store(semcache_pb2.StoreRequest(key=key(), chunks=answer()))
    await cache.stop(svc)
    assert not any(tmp_path.iterdir())


async def test_metrics_count_hits_and_entries(cache):
    svc, stub = await cache()
    await stub.Store(semcache_pb2.StoreRequest(key=key(), chunks=answer()))
    await stub.Lookup(semcache_pb2.LookupRequest(key=key()))
    await stub.Lookup(semcache_pb2.LookupRequest(key=key("unrelated words entirely")))
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.host.metrics.port}/metrics", timeout=5) as r:  # noqa: S310
        body = r.read().decode()
    assert 'llmfabric_semcache_lookups_total{result="hit_exact"} 1.0' in body
    assert 'llmfabric_semcache_lookups_total{result="miss"} 1.0' in body
    assert "llmfabric_semcache_entries 1.0" in body and "llmfabric_semcache_lookup_seconds_count 2.0" in body

"""Cache-aware routing: CacheAwareRouter on WorkerHandle objects built
directly, its corrections from load reports and pool events, and end to end
through Submit."""

from __future__ import annotations

import collections

import pytest

from llmfabric.scheduler.discovery import Endpoint, StaticDiscovery
from llmfabric.scheduler.pool import WorkerHandle, WorkerPool
from llmfabric.scheduler.router import (
    CacheAwareRouter,
    LeastLoadRouter,
    RoundRobinRouter,
    RouteReason,
    RoutingPolicy,
    create_router,
)
from llmfabric.structs import Sampling, ValidatedRequest
from llmfabric.worker.v1 import worker_pb2

SYSTEM_A = tuple(range(1000, 1100))  # a 100-token shared prefix
SYSTEM_B = tuple(range(2000, 2100))


def _req(prompt, *, tenant: str = "", salt: str = "", model: str = "m", rid: str = "r") -> ValidatedRequest:
    return ValidatedRequest(rid, model, tuple(prompt), Sampling(0.0, 1.0, 0, 4), tenant_id=tenant, cache_salt=salt)


def _handle(address: str, *, capacity: int = 8, in_flight: int = 0, load=None) -> WorkerHandle:
    return WorkerHandle(address, channel=None, stub=None, id=address, capacity=capacity, in_flight=in_flight,
                        healthy=True, load=load)


def _load(**kw) -> worker_pb2.GetLoadResponse:
    return worker_pb2.GetLoadResponse(**kw)


def _pick(router, workers, prompt, **kw):
    return router.pick(workers, _req(prompt, **kw), workers)


# ------------------------------------------------------------------ factory


def test_create_router_builds_cache_aware_with_parameters():
    r = create_router("cache_aware", cache_threshold=0.7, balance_abs_threshold=4, tree_tokens=10)
    assert isinstance(r, CacheAwareRouter)
    assert (r.cache_threshold, r.balance_abs_threshold, r.tree_tokens) == (0.7, 4, 10)
    assert isinstance(create_router(RoutingPolicy.CACHE_AWARE), CacheAwareRouter)
    assert RoutingPolicy("cache_aware") is RoutingPolicy.CACHE_AWARE


@pytest.mark.parametrize("kw", [{"cache_threshold": 1.5}, {"cache_threshold": -0.1}, {"balance_abs_threshold": -1},
                                {"balance_rel_threshold": 0.5}, {"tree_tokens": 0}])
def test_bad_parameters_are_rejected(kw):
    with pytest.raises(ValueError):
        CacheAwareRouter(**kw)


def test_other_policies_report_their_reason():
    a, b = _handle("h:1"), _handle("h:2")
    for r in (RoundRobinRouter(), LeastLoadRouter()):
        r.pick([a, b], _req((1, 2)))
        assert r.last_reason is RouteReason.POLICY and r.decisions[RouteReason.POLICY] == 1


# ------------------------------------------------------------------ decisions


def test_same_prefix_sticks_to_one_worker():
    a, b, c = _handle("h:1"), _handle("h:2"), _handle("h:3")
    r = CacheAwareRouter()
    first = _pick(r, [a, b, c], SYSTEM_A + (1,))
    assert r.last_reason is RouteReason.MISS
    picks = {_pick(r, [a, b, c], SYSTEM_A + (i, i + 1)) for i in range(2, 20)}
    assert picks == {first}
    assert r.last_reason is RouteReason.CACHE_HIT and r.last_match == len(SYSTEM_A)
    assert r.decisions == collections.Counter({RouteReason.MISS: 1, RouteReason.CACHE_HIT: 18})


def test_different_prefixes_spread_and_then_stick():
    a, b = _handle("h:1"), _handle("h:2")
    r = CacheAwareRouter()
    wa = _pick(r, [a, b], SYSTEM_A + (1,))
    wb = _pick(r, [a, b], SYSTEM_B + (1,))
    assert wa is not wb
    for i in range(5):
        assert _pick(r, [a, b], SYSTEM_A + (i,)) is wa
        assert _pick(r, [a, b], SYSTEM_B + (i,)) is wb


def test_misses_at_low_concurrency_do_not_all_land_on_one_worker():
    """SGLang's hotspot: at concurrency 1 every miss went to the same replica."""
    workers = [_handle(f"h:{i}") for i in range(4)]
    r = CacheAwareRouter()
    got = collections.Counter()
    for i in range(40):
        prompt = tuple(range(i * 1000, i * 1000 + 50))  # all distinct: all misses
        got[_pick(r, workers, prompt).address] += 1
        assert r.last_reason is RouteReason.MISS
    assert set(got) == {w.address for w in workers}
    assert max(got.values()) - min(got.values()) <= 1


def test_miss_prefers_the_least_loaded_over_the_smallest_tree():
    busy, idle = _handle("h:1", in_flight=2), _handle("h:2")
    r = CacheAwareRouter(balance_abs_threshold=100)
    for i in range(5):  # idle's tree gets big, busy's stays empty
        r.pick([idle], _req(tuple(range(i * 100, i * 100 + 50))), [busy, idle])
    assert _pick(r, [busy, idle], (7, 7, 7)) is idle  # least load first, not smallest tree


def test_imbalance_overrides_affinity():
    a, b = _handle("h:1"), _handle("h:2")
    r = CacheAwareRouter(balance_abs_threshold=2, balance_rel_threshold=1.5)
    home = _pick(r, [a, b], SYSTEM_A)
    other = b if home is a else a
    home.in_flight = 4  # 4 - 0 > 2 and 4 > 0 * 1.5
    assert _pick(r, [a, b], SYSTEM_A + (5,)) is other
    assert r.last_reason is RouteReason.BALANCE
    # Balanced again: affinity comes back (the home worker kept its tree).
    home.in_flight = other.in_flight = 1
    assert _pick(r, [a, b], SYSTEM_A + (6,)) in (home, other)
    assert r.last_reason is RouteReason.CACHE_HIT


def test_small_spread_is_not_imbalance():
    a, b = _handle("h:1"), _handle("h:2")
    r = CacheAwareRouter(balance_abs_threshold=2, balance_rel_threshold=1.5)
    home = _pick(r, [a, b], SYSTEM_A)
    home.in_flight = 2  # spread 2 is not > 2
    assert _pick(r, [a, b], SYSTEM_A + (5,)) is home and r.last_reason is RouteReason.CACHE_HIT
    # Both thresholds must hold: spread 3 but ratio 6/3 = 2 > 1.5 → imbalance; ratio 13/10 → not.
    home.in_flight, (b if home is a else a).in_flight = 13, 10
    assert _pick(r, [a, b], SYSTEM_A + (6,)) is home and r.last_reason is RouteReason.CACHE_HIT


def test_balance_keeps_affinity_among_the_lightly_loaded():
    """Rebalancing picks the best match among workers near the least load,
    not blindly the least-loaded one."""
    a, b, c = _handle("h:1"), _handle("h:2"), _handle("h:3")
    r = CacheAwareRouter(balance_abs_threshold=2, balance_rel_threshold=1.5)
    r.pick([b], _req(SYSTEM_A), [a, b, c])  # b holds the prefix
    a.in_flight, b.in_flight, c.in_flight = 10, 1, 0  # imbalanced; b is within 2 of the least
    assert _pick(r, [a, b, c], SYSTEM_A + (1,)) is b
    assert r.last_reason is RouteReason.BALANCE


def test_imbalance_counts_healthy_workers_that_are_not_candidates():
    full, a, b = _handle("h:0", capacity=8, in_flight=8), _handle("h:1"), _handle("h:2")
    r = CacheAwareRouter(balance_abs_threshold=2)
    r.pick([a], _req(SYSTEM_A), [a, b])
    a.in_flight = 1
    assert r.pick([a, b], _req(SYSTEM_A + (1,)), [a, b]) is a  # 1 vs 0: balanced, a hit
    assert r.last_reason is RouteReason.CACHE_HIT
    # The full worker (not a candidate) makes the fleet imbalanced; a is
    # still within balance_abs_threshold of the least load, so it keeps the prefix.
    assert r.pick([a, b], _req(SYSTEM_A + (2,)), [full, a, b]) is a
    assert r.last_reason is RouteReason.BALANCE
    a.in_flight = 3  # now outside the window: the least-loaded one
    assert r.pick([a, b], _req(SYSTEM_A + (3,)), [full, a, b]) is b
    assert r.last_reason is RouteReason.BALANCE


def test_threshold_respected():
    a, b = _handle("h:1"), _handle("h:2")
    r = CacheAwareRouter(cache_threshold=0.5)
    home = _pick(r, [a, b], SYSTEM_A)  # 100 tokens
    # 100 of 150 tokens match (0.67 ≥ 0.5): a hit.
    assert _pick(r, [a, b], SYSTEM_A + tuple(range(50))) is home and r.last_reason is RouteReason.CACHE_HIT
    # 100 of 250 (0.4 < 0.5): a miss, which goes to the emptier worker.
    other = _pick(r, [a, b], SYSTEM_A + tuple(range(5000, 5150)))
    assert r.last_reason is RouteReason.MISS and other is not home


def test_namespaces_isolate_tenants_models_and_salts():
    a, b = _handle("h:1"), _handle("h:2")
    r = CacheAwareRouter()
    home = _pick(r, [a, b], SYSTEM_A, tenant="t1")
    for kw in ({"tenant": "t2"}, {"tenant": "t1", "salt": "s"}, {"tenant": "t1", "model": "other"}):
        _pick(r, [a, b], SYSTEM_A + (1,), **kw)
        assert r.last_reason is RouteReason.MISS and r.last_match == 0, kw
    assert _pick(r, [a, b], SYSTEM_A + (2,), tenant="t1") is home and r.last_reason is RouteReason.CACHE_HIT


def test_empty_prompt_is_a_miss():
    a = _handle("h:1")
    r = CacheAwareRouter()
    assert _pick(r, [a], ()) is a and r.last_reason is RouteReason.MISS


# ------------------------------------------------------------------ tree bounds and corrections


def test_tree_is_bounded_by_the_workers_kv_size():
    a = _handle("h:1", load=_load(kv_used=0, kv_free=500))
    r = CacheAwareRouter(tree_tokens=10_000)
    for i in range(20):
        _pick(r, [a], tuple(range(i * 1000, i * 1000 + 100)))
        assert r.trees["h:1"].cache.total_tokens <= 500
    # The most recent prompt survives (LRU eviction).
    _pick(r, [a], tuple(range(19_000, 19_100)) + (1,))
    assert r.last_reason is RouteReason.CACHE_HIT


def test_tree_without_a_load_report_is_bounded_by_the_budget():
    a = _handle("h:1")
    r = CacheAwareRouter(tree_tokens=300)
    for i in range(10):
        _pick(r, [a], tuple(range(i * 1000, i * 1000 + 100)))
        assert r.trees["h:1"].cache.total_tokens <= 300


def test_reported_evictions_trim_the_tree():
    a = _handle("h:1")
    r = CacheAwareRouter()
    for i in range(5):
        _pick(r, [a], tuple(range(i * 1000, i * 1000 + 100)))
    prev = _load(kv_used=500, kv_free=1000, prompt_tokens_total=500, evictions_total=0)
    a.load = _load(kv_used=200, kv_free=1300, prompt_tokens_total=500, evictions_total=3)
    r.worker_load(a, prev, restarted=False)
    assert r.trees["h:1"].cache.total_tokens <= 200


def test_kv_drop_trims_but_steady_reports_do_not():
    a = _handle("h:1")
    r = CacheAwareRouter()
    for i in range(5):
        _pick(r, [a], tuple(range(i * 1000, i * 1000 + 100)))
    steady = _load(kv_used=0, kv_free=4096, prompt_tokens_total=500)  # an engine that does not report kv_used
    a.load = steady
    r.worker_load(a, steady, restarted=False)
    assert r.trees["h:1"].cache.total_tokens == 500
    a.load = _load(kv_used=0, kv_free=4096, prompt_tokens_total=500)
    r.worker_load(a, _load(kv_used=500, kv_free=3596, prompt_tokens_total=500), restarted=False)  # a flush
    assert r.trees["h:1"].cache.total_tokens == 0


def test_restart_clears_the_tree_but_ordinary_reports_do_not():
    a, b = _handle("h:1"), _handle("h:2")
    r = CacheAwareRouter()
    home = _pick(r, [a, b], SYSTEM_A)
    report = _load(kv_free=4096, prompt_tokens_total=100)
    home.load = report
    for _ in range(5):
        r.worker_load(home, report, restarted=False)
    assert r.trees[home.address].cache.total_tokens == len(SYSTEM_A)
    r.worker_load(home, report, restarted=True)
    assert home.address not in r.trees
    _pick(r, [a, b], SYSTEM_A + (1,))
    assert r.last_reason is RouteReason.MISS


class _Stub:
    """GetInfo/GetLoad answering from a list of load reports."""

    def __init__(self, loads):
        self.loads = list(loads)

    async def GetInfo(self, req, timeout=None):  # noqa: N802 - gRPC name
        return worker_pb2.GetInfoResponse(worker_id="w", capacity=4)

    async def GetLoad(self, req, timeout=None):  # noqa: N802 - gRPC name
        return self.loads.pop(0)


async def test_pool_probes_detect_restart_and_tell_the_router_without_touching_in_flight():
    pool = WorkerPool(StaticDiscovery([]))
    r = CacheAwareRouter()
    pool.listeners.append(r)
    w = _handle("h:1")
    w.stub = _Stub([_load(kv_free=4096, prompt_tokens_total=n) for n in (100, 200, 300, 50)])
    pool.workers[w.address] = w
    r.pick([w], _req(SYSTEM_A), [w])
    w.in_flight = 3
    for _ in range(3):  # counters grow: ordinary probes
        await pool.probe_all()
    assert w.restarts == 0 and r.trees[w.address].cache.total_tokens == len(SYSTEM_A)
    assert w.in_flight == 3  # probes never reset the scheduler's own counts
    await pool.probe_all()  # prompt_tokens_total went down: a new process
    assert w.restarts == 1 and w.address not in r.trees
    assert w.in_flight == 3


async def test_a_worker_leaving_the_pool_drops_its_tree():
    pool = WorkerPool(StaticDiscovery([]))
    r = CacheAwareRouter()
    pool.listeners.append(r)
    pool._apply([Endpoint("127.0.0.1:1"), Endpoint("127.0.0.1:2")])
    for w in pool.workers.values():
        w.healthy = True
    w1 = pool.workers["127.0.0.1:1"]
    r.pick([w1], _req(SYSTEM_A), [w1])
    assert "127.0.0.1:1" in r.trees
    pool._apply([Endpoint("127.0.0.1:2")])
    assert "127.0.0.1:1" not in r.trees and not w1.has_slot
    await pool.close()


# ------------------------------------------------------------------ end to end


async def test_same_prefix_requests_stick_through_the_scheduler(cluster):
    workers = [await cluster.add_worker(capacity=2), await cluster.add_worker(capacity=2)]
    sched = await cluster.start_scheduler(routing="cache_aware")
    for i in range(6):
        await sched.run(f"a{i}", prompt=SYSTEM_A + (i,))
        await sched.run(f"b{i}", prompt=SYSTEM_B + (i,))
    by_worker = [sorted(w.engine.started) for w in workers]
    assert sorted(by_worker) == [[f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)]]
    router = sched.svc.dispatcher.router
    assert router.decisions[RouteReason.MISS] == 2 and router.decisions[RouteReason.CACHE_HIT] == 10


async def test_probes_do_not_reset_trees_through_the_scheduler(cluster):
    workers = [await cluster.add_worker(), await cluster.add_worker()]
    sched = await cluster.start_scheduler(routing="cache_aware", probe_interval=0.02)
    await sched.run("first", prompt=SYSTEM_A)
    router = sched.svc.dispatcher.router
    (home,) = [w for w in workers if w.engine.started]
    reports = collections.Counter()

    class Count:
        def worker_load(self, worker, previous, restarted):
            reports[worker.address] += 1

        def worker_removed(self, worker):
            pass

    sched.svc.pool.listeners.append(Count())
    await cluster.eventually(lambda: reports[home.address] >= 10, what="ten probe reports")
    assert router.trees[home.address].cache.total_tokens == len(SYSTEM_A)
    await sched.run("again", prompt=SYSTEM_A + (1,))
    assert home.engine.started == ["first", "again"] and router.last_reason is RouteReason.CACHE_HIT


def test_a_worker_with_an_open_breaker_does_not_count_as_spare_capacity():
    a, b, out = _handle("h:1"), _handle("h:2"), _handle("h:3")
    for _ in range(3):
        out.breaker.on_failure()  # open: healthy by probe, no traffic
    r = CacheAwareRouter(balance_abs_threshold=2)
    home = _pick(r, [a, b], SYSTEM_A)
    home.in_flight = 3
    other = b if home is a else a
    other.in_flight = 2
    assert r.pick([a, b], _req(SYSTEM_A + (1,)), [a, b, out]) is home
    assert r.last_reason is RouteReason.CACHE_HIT

"""The radix prefix cache inside the real embedded engine (llama.cpp,
SmolLM2-135M on the CPU).

What is checked: reuse is reported (``cached_tokens``) exactly and never
changes the greedy answer; namespaces (model, tenant, cache salt) never
share; cancellation, eviction and flushing keep the tree's accounting equal
to llama.cpp's real cells (``llama_memory_seq_pos_min/max`` per sequence id);
continuous batching with chunked prefill never feeds one sequence more than
``prefill_chunk`` prompt tokens a step and never changes what a running
stream says.

llama.cpp's CPU kernels are not batch-invariant (a sequence's logits move a
little with the shape of the batch it shares), so outputs are compared with
solo runs on prompts whose greedy continuation wins by a wide margin, and
over a stable prefix of tokens where sequences share a batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time

import llama_cpp
import pytest
from fabric_testing import GENERATION_TIMEOUT as TIMEOUT, ids_of, run  # tests/ is on sys.path (tests/conftest.py)

from llmfabric.structs import Finish

# see test_worker_embedded.py: 2 batch threads stall on this 2-core machine

# Prompts with a wide-margin greedy continuation (see test_worker_embedded.py).
COUNT = "1, 2, 3, 4, 5, 6,"
TENS = "10, 20, 30, 40, 50,"
LETTERS = "a b c d e f g"
FOX = "The quick brown fox jumps over the lazy dog. "
SEA = "Write a short poem about the sea."
MOON = "Write a short poem about the moon."


# ------------------------------------------------------------------ fixtures and helpers


def usage(chunks):
    assert chunks[-1].finish is not None and chunks[-1].usage is not None
    return chunks[-1].usage


def variant(req, rid: str, *, prompt=None, max_tokens: int | None = None):
    """``req`` under another id, with another prompt and/or max_tokens."""
    if prompt is not None:
        req = dataclasses.replace(req, prompt_token_ids=tuple(prompt))
    if max_tokens is not None:
        req = dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, max_tokens=max_tokens))
    return dataclasses.replace(req, request_id=rid)


def lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _engine_parked(engine) -> bool:
    """The engine thread is between steps, in ``_drain_inbox``."""
    frame = sys._current_frames().get(engine._thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "_drain_inbox":
            return True
        frame = frame.f_back
    return False


async def idle(engine, wait_until) -> None:
    """Bounded wait until nothing runs and only the cache holds cells.

    ``_reap`` takes a sequence off the running list before it releases its
    cells (and its sequence id), so ``load()`` may show ``running == 0`` a
    moment early: also wait for the engine thread to be back in
    ``_drain_inbox``, which it reaches only after the release."""

    def check():
        ld = engine.load()
        return (
            ld.running == 0
            and ld.waiting == 0
            and _engine_parked(engine)
            and engine.load().kv_used == engine.slots.tree.total_tokens
        )

    await wait_until(check, timeout=10, what=f"engine idle (load={engine.load()})")


async def cold(engine, wait_until) -> None:
    """Idle and empty: no cached prefix left."""
    await idle(engine, wait_until)
    await engine.flush_cache()
    assert engine.slots.tree.total_tokens == 0
    assert engine.load().kv_used == 0


def n_seq(engine) -> int:
    return llama_cpp.llama_n_seq_max(engine._ctx)


def pos_range(engine, seq_id: int) -> tuple[int, int]:
    """(pos_min, pos_max) of a llama.cpp sequence; (-1, -1) when empty."""
    return (
        llama_cpp.llama_memory_seq_pos_min(engine._mem, seq_id),
        llama_cpp.llama_memory_seq_pos_max(engine._mem, seq_id),
    )


def assert_cells_agree(engine) -> None:
    """With the engine idle: every sequence id is either free (no cells in
    llama.cpp) or a holder whose cells span exactly its tree nodes."""
    slots, tree = engine.slots, engine.slots.tree
    holders = tree.values_in_use()
    free = list(slots.free_ids)
    assert len(free) == len(set(free)), f"a sequence id is free twice: {sorted(free)}"
    assert not set(free) & set(holders), "a free sequence id still owns cache nodes"
    assert set(free) | set(holders) == set(range(n_seq(engine))), "a sequence id leaked"
    for s in free:
        assert pos_range(engine, s) == (-1, -1), f"free seq {s} still has cells {pos_range(engine, s)}"
    spans: dict[int, list[tuple[int, int]]] = {}
    for node in tree.nodes():
        spans.setdefault(node.value, []).append((node.start, node.end))
    for holder, nodes in spans.items():
        lo, hi = min(s for s, _ in nodes), max(e for _, e in nodes)
        pmin, pmax = pos_range(engine, holder)
        assert pmax >= hi - 1, f"holder {holder}: tree nodes {sorted(nodes)} but llama.cpp cells end at {pmax}"
        assert (pmin, pmax) == (lo, hi - 1), f"holder {holder}: tree nodes {sorted(nodes)}, cells [{pmin}, {pmax}]"
    assert engine.load().kv_used == tree.total_tokens


class DecodeSpy:
    """Wraps ``llama_cpp.llama_decode`` and records, for one context, every
    call's tokens as ``{seq_id: [(pos, token), ...]}`` (plus the tree's
    eviction counter at that moment)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.calls: list[dict[int, list[tuple[int, int]]]] = []
        self.evictions: list[int] = []
        self._orig = llama_cpp.llama_decode

    def __call__(self, ctx, batch):
        if ctx is self.engine._ctx:
            per: dict[int, list[tuple[int, int]]] = {}
            for i in range(batch.n_tokens):
                per.setdefault(batch.seq_id[i][0], []).append((batch.pos[i], batch.token[i]))
            self.calls.append(per)
            self.evictions.append(self.engine.slots.tree.evictions)
        return self._orig(ctx, batch)

    def tokens_fed(self, seq_id: int) -> list[int]:
        return [len(c[seq_id]) for c in self.calls if seq_id in c]


@pytest.fixture
def spy(monkeypatch):
    """``spy(engine)`` → a DecodeSpy installed for the rest of the test."""

    def install(engine) -> DecodeSpy:
        s = DecodeSpy(engine)
        monkeypatch.setattr(llama_cpp, "llama_decode", s)
        return s

    return install


async def first_chunks(agen, n: int) -> list:
    out = []
    while len(out) < n:
        out.append(await asyncio.wait_for(agen.__anext__(), TIMEOUT))
        assert out[-1].finish is None, "stream ended early"
    return out


def running_seq_id(engine, rid: str) -> int:
    for seq in list(engine._running):
        if seq.request.request_id == rid:
            return seq.seq_id
    raise AssertionError(f"{rid} is not running")


# ------------------------------------------------------------------ reuse is reported and harmless


async def test_same_request_twice_reuses_all_but_the_last_prompt_token(engine, make_request, wait_until):
    await cold(engine, wait_until)
    req = make_request("twice", user=SEA, max_tokens=16)
    n = len(req.prompt_token_ids)
    first, second = await run(engine, req), await run(engine, req)
    assert usage(first).cached_tokens == 0
    assert usage(second).cached_tokens == n - 1
    assert usage(second).prompt_tokens == n
    assert ids_of(second) == ids_of(first)


async def test_shared_prefix_reports_the_common_length_and_answers_like_cold(engine, make_request, wait_until):
    a = make_request("sea", user=SEA, max_tokens=16)
    b = make_request("moon", user=MOON, max_tokens=16)
    common = lcp(a.prompt_token_ids, b.prompt_token_ids)
    assert 10 < common < len(b.prompt_token_ids) - 1  # system prompt + template shared, the subject differs

    await cold(engine, wait_until)
    b_cold = await run(engine, b)
    assert usage(b_cold).cached_tokens == 0

    await cold(engine, wait_until)
    await run(engine, a)
    b_warm = await run(engine, b)
    assert usage(b_warm).cached_tokens == common
    assert ids_of(b_warm) == ids_of(b_cold)
    ld = engine.load()
    assert ld.cached_tokens_total >= common


async def test_cached_length_is_capped_at_prompt_minus_one(engine, make_request, wait_until):
    await cold(engine, wait_until)
    a = make_request("long", user=SEA, max_tokens=4)
    await run(engine, a)
    short = variant(a, "short", prompt=a.prompt_token_ids[:12])
    chunks = await run(engine, short)
    assert usage(chunks).cached_tokens == 11  # a strict prefix of what is cached: all but its last token


async def test_multi_turn_reuses_the_previous_answer(engine, make_request, vocab, wait_until):
    """A follow-up whose prompt is the last prompt + the answer + more reuses
    both the prompt and the answer's computed tokens."""
    await cold(engine, wait_until)
    a = make_request("turn1", user=SEA, max_tokens=12)
    answer = await run(engine, a)
    assert answer[-1].finish is Finish.LENGTH
    out = ids_of(answer)
    # all but the last sampled token went through llama_decode
    computed = len(a.prompt_token_ids) + len(out) - 1
    more = vocab.tokenize(" And now one about the moon, please.", add_special=False, parse_special=False)
    follow = variant(a, "turn2", prompt=a.prompt_token_ids + tuple(out) + tuple(more))
    second = await run(engine, follow)
    assert usage(second).cached_tokens == computed
    assert usage(second).prompt_tokens == len(follow.prompt_token_ids)

    await cold(engine, wait_until)
    assert ids_of(await run(engine, follow)) == ids_of(second)


# ------------------------------------------------------------------ namespaces


async def test_tenants_salts_and_models_never_share(engine, make_request, wait_until):
    await cold(engine, wait_until)
    base = make_request("ns", user=SEA, max_tokens=8)
    n = len(base.prompt_token_ids)
    variants = [
        base,
        dataclasses.replace(base, tenant_id="acme"),
        dataclasses.replace(base, tenant_id="globex"),
        dataclasses.replace(base, tenant_id="acme", cache_salt="s1"),
        dataclasses.replace(base, model=base.model + "-other"),
    ]
    firsts = [await run(engine, r) for r in variants]
    assert [usage(c).cached_tokens for c in firsts] == [0] * len(variants)  # identical tokens, never shared
    # each namespace reuses its own entry
    seconds = [await run(engine, r) for r in variants]
    assert [usage(c).cached_tokens for c in seconds] == [n - 1] * len(variants)
    # a prompt sharing only the system prefix with another tenant's entry: nothing
    other = make_request("ns2", user=MOON, max_tokens=4)
    chunks = await run(engine, dataclasses.replace(other, tenant_id="initech"))
    assert usage(chunks).cached_tokens == 0
    assert all(ids_of(c) == ids_of(firsts[0]) for c in firsts + seconds)
    await idle(engine, wait_until)
    assert_cells_agree(engine)


# ------------------------------------------------------------------ continuous batching


async def test_a_request_joining_mid_flight_changes_neither_output(engine, make_request, spy, wait_until):
    a = make_request("A", text=COUNT, max_tokens=200)
    b = make_request("B", text=TENS, max_tokens=16)
    await cold(engine, wait_until)
    solo_a = ids_of(await run(engine, variant(a, "A-solo", max_tokens=24)))
    solo_b = ids_of(await run(engine, b))
    await cold(engine, wait_until)

    s = spy(engine)
    agen = engine.generate(a)
    got_a = await first_chunks(agen, 2)
    a_id = running_seq_id(engine, "A")
    b_chunks = await run(engine, b)  # joins while A decodes
    got_a += await first_chunks(agen, 24 - len(got_a))
    await agen.aclose()

    assert ids_of(got_a)[:24] == solo_a[:24]
    assert ids_of(b_chunks)[:16] == solo_b[:16]
    # B's prompt went into a batch next to A's decode token: it joined mid-flight
    joined = [c for c in s.calls if len(c.get(a_id, ())) == 1 and any(k != a_id and len(v) > 1 for k, v in c.items())]
    assert joined, "B's prefill never shared a step with A's decoding"
    await idle(engine, wait_until)


async def test_chunked_prefill_feeds_at_most_a_chunk_per_step(fresh_engine, make_request, spy, wait_until):
    chunk = 16
    eng = await fresh_engine(capacity=2, prefill_chunk=chunk)
    a = make_request("A", text=COUNT, max_tokens=400)
    long = make_request("L", text=FOX * 30, max_tokens=8)
    n_long = len(long.prompt_token_ids)
    assert 250 < n_long < 400

    solo_long = ids_of(await run(eng, long))
    await cold(eng, wait_until)
    solo_a = ids_of(await run(eng, variant(a, "A-solo", max_tokens=24)))
    await cold(eng, wait_until)

    s = spy(eng)
    agen = eng.generate(a)
    got_a = await first_chunks(agen, 2)
    a_id = running_seq_id(eng, "A")
    long_chunks = await run(eng, long)
    got_a += await first_chunks(agen, 24 - len(got_a))
    await agen.aclose()

    assert ids_of(long_chunks) == solo_long
    assert ids_of(got_a)[:24] == solo_a[:24]
    assert usage(long_chunks).cached_tokens == 0
    # never more than a chunk of one sequence's prompt in one llama_decode
    assert s.calls
    for call in s.calls:
        for seq_id, toks in call.items():
            assert len(toks) <= chunk, (seq_id, len(toks))
            assert [p for p, _ in toks] == list(range(toks[0][0], toks[0][0] + len(toks))), "positions not contiguous"
    long_ids = {k for c in s.calls for k, v in c.items() if k != a_id and len(v) > 1}
    assert len(long_ids) == 1
    (l_id,) = long_ids
    fed = s.tokens_fed(l_id)
    prefill = [n for n in fed if n > 1]
    assert sum(prefill) >= n_long - chunk and len(prefill) >= (n_long - 1) // chunk
    # A kept decoding while L's prompt went in chunk by chunk
    assert sum(1 for c in s.calls if l_id in c and len(c[l_id]) > 1 and len(c.get(a_id, ())) == 1) >= len(prefill) - 1
    await idle(eng, wait_until)
    assert_cells_agree(eng)


# ------------------------------------------------------------------ cancellation


async def test_cancelling_frees_running_cells_and_caches_the_computed_prefix(engine, make_request, vocab, wait_until):
    await cold(engine, wait_until)
    req = make_request("cancel", text=COUNT, max_tokens=400)
    agen = engine.generate(req)
    got = await first_chunks(agen, 5)
    assert engine.load().kv_used > engine.slots.tree.total_tokens  # its own cells
    await agen.aclose()
    await idle(engine, wait_until)  # kv_used == tree total: the running cells are gone
    assert_cells_agree(engine)
    n_prompt = len(req.prompt_token_ids)
    assert engine.slots.tree.total_tokens >= n_prompt + 4  # the prompt and the decoded answer tokens

    out = ids_of(got)
    extra = next(t for t in vocab.tokenize(" hello world", add_special=False, parse_special=False) if t != out[4])
    follow = variant(req, "follow", prompt=req.prompt_token_ids + tuple(out[:4]) + (extra,), max_tokens=8)
    warm = await run(engine, follow)
    assert usage(warm).cached_tokens == n_prompt + 4
    await cold(engine, wait_until)
    assert ids_of(await run(engine, follow)) == ids_of(warm)


async def test_cancelling_during_chunked_prefill_caches_the_chunks_done(
    fresh_engine, make_request, spy, wait_until
):
    chunk = 16
    eng = await fresh_engine(capacity=1, prefill_chunk=chunk)
    req = make_request("L", text=FOX * 30, max_tokens=8)
    n = len(req.prompt_token_ids)
    cold_out = ids_of(await run(eng, req))
    await cold(eng, wait_until)

    s = spy(eng)
    agen = eng.generate(req)
    task = asyncio.ensure_future(agen.__anext__())
    await wait_until(lambda: len(s.calls) >= 3, timeout=TIMEOUT, what="three prefill chunks decoded")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await agen.aclose()
    await idle(eng, wait_until)
    assert_cells_agree(eng)

    done = eng.slots.tree.total_tokens
    if done >= n:  # the whole prompt went in before the cancel landed (a very slow event loop)
        pytest.skip("prefill finished before the cancellation was seen")
    assert done > 0 and done % chunk == 0
    again = await run(eng, req)
    assert usage(again).cached_tokens == done
    assert ids_of(again) == cold_out


async def test_cancelling_one_stream_leaves_the_other_intact(engine, make_request, wait_until):
    await cold(engine, wait_until)
    keep = make_request("keep", text=LETTERS, max_tokens=16)
    solo = ids_of(await run(engine, keep))
    await cold(engine, wait_until)
    doomed = engine.generate(make_request("doomed", text=COUNT, max_tokens=400))
    await first_chunks(doomed, 2)
    task = asyncio.ensure_future(run(engine, keep))
    await wait_until(lambda: engine.load().running == 2 or task.done(), timeout=TIMEOUT, what="both running")
    await doomed.aclose()
    assert ids_of(await task)[:8] == solo[:8]
    await idle(engine, wait_until)
    assert_cells_agree(engine)


# ------------------------------------------------------------------ eviction


DISTINCT = [
    "Monday, Tuesday, Wednesday, Thursday,",
    "January, February, March, April,",
    "100, 101, 102, 103, 104,",
    "A, B, C, D, E, F,",
    "2, 4, 6, 8, 10, 12,",
    "one, two, three, four, five,",
    "5, 10, 15, 20, 25,",
    "Sunday, Monday, Tuesday,",
    "alpha, beta, gamma, delta,",
    "200, 300, 400, 500,",
    "first, second, third, fourth,",
    "3, 6, 9, 12, 15,",
    "red, orange, yellow, green,",
    "z y x w v u",
]


async def test_eviction_under_pressure_never_breaks_a_running_sequence(
    fresh_engine, make_request, spy, wait_until
):
    big = await fresh_engine(capacity=1, context_length=512)
    reqs = [make_request(f"d{i}", text=p, max_tokens=8) for i, p in enumerate(DISTINCT)]
    longreq = make_request("long", text=COUNT, max_tokens=100)
    expected = [ids_of(await run(big, r)) for r in reqs]
    expected_long = ids_of(await run(big, longreq))

    eng = await fresh_engine(capacity=2, context_length=128)  # 256 KV cells in all
    assert eng.slots.n_ctx == 256
    # fill the cache first (~120 tokens): the long sequence (~120 cells) and the
    # requests beside it then cannot fit without evicting
    warm = [await run(eng, r) for r in reqs[:7]]
    assert [ids_of(c) for c in warm] == expected[:7]

    s = spy(eng)
    long_task = asyncio.ensure_future(run(eng, longreq))
    await wait_until(lambda: any(q.request.request_id == "long" for q in list(eng._running)), what="long runs")
    long_id = running_seq_id(eng, "long")
    rest = [await run(eng, r) for r in reqs[7:]]
    long_chunks = await long_task

    # these ran batched beside the long sequence: batched CPU kernels may flip a
    # near-tie a few tokens in (seen at token 4 for one prompt), so compare the
    # stable head; corruption by eviction would break them from the first token
    assert [ids_of(c)[:3] for c in rest] == [e[:3] for e in expected[7:]]
    assert all(c[-1].finish in (Finish.LENGTH, Finish.STOP) for c in rest)
    assert long_chunks[-1].finish is Finish.LENGTH
    assert ids_of(long_chunks)[:48] == expected_long[:48]
    # evictions happened in steps where the long sequence was decoding
    during = [ev for call, ev in zip(s.calls, s.evictions) if long_id in call]
    assert during[-1] > during[0], "no eviction while the long sequence ran"
    await idle(eng, wait_until)
    assert_cells_agree(eng)
    # what is still cached answers like cold
    again = [await run(eng, r) for r in reqs[-3:]]
    assert [ids_of(c) for c in again] == [e[:8] for e in expected[-3:]]
    await idle(eng, wait_until)
    assert_cells_agree(eng)


async def test_running_out_of_sequence_ids_evicts_cache_holders(fresh_engine, make_request, wait_until):
    eng = await fresh_engine(capacity=1, cache_seqs=1)  # 2 sequence ids: one runs, one may hold a prefix
    assert n_seq(eng) == 2
    reqs = [make_request(f"u{i}", user=u, max_tokens=6) for i, u in enumerate([SEA, MOON, "Name three colours."])]
    outs = [await run(eng, r) for r in reqs]
    assert eng.load().evictions_total > 0
    await idle(eng, wait_until)
    assert_cells_agree(eng)
    again = [await run(eng, r) for r in reqs]
    assert [ids_of(c) for c in again] == [ids_of(c) for c in outs]
    # two ids: a holder must be evicted for every admission, so at most the shared template survives
    assert all(usage(c).cached_tokens <= lcp(reqs[0].prompt_token_ids, reqs[1].prompt_token_ids) for c in again)
    await idle(eng, wait_until)
    assert_cells_agree(eng)


async def test_decoding_sequences_do_not_evict_a_cache_that_fits(fresh_engine, make_request, wait_until):
    eng = await fresh_engine(capacity=2, context_length=128)  # 256 cells
    p = make_request("p", text="The capital of France is Paris. The capital of Italy is", max_tokens=4)
    await run(eng, p)
    await idle(eng, wait_until)
    cached = eng.slots.tree.total_tokens
    assert 0 < cached < 32
    x = eng.generate(make_request("x", text=COUNT, max_tokens=40))
    await first_chunks(x, 1)
    y = await run(eng, make_request("y", text=LETTERS, max_tokens=8))  # decodes next to x: ~90 cells in use
    await x.aclose()
    assert y[-1].finish is not None
    again = await run(eng, p)
    assert usage(again).cached_tokens == len(p.prompt_token_ids) - 1


# ------------------------------------------------------------------ flush and agreement with llama.cpp


async def test_flush_returns_cached_tokens_and_empties_every_sequence(engine, make_request, wait_until):
    await cold(engine, wait_until)
    for rid, user in (("f1", SEA), ("f2", MOON)):
        await run(engine, make_request(rid, user=user, max_tokens=8))
    await idle(engine, wait_until)
    cached = engine.slots.tree.total_tokens
    assert cached > 0
    assert engine.slots.tree.values_in_use()
    assert_cells_agree(engine)

    assert await engine.flush_cache() == cached
    ld = engine.load()
    assert ld.kv_used == 0 and ld.kv_free == 2 * 512
    assert engine.slots.tree.total_tokens == 0 and engine.slots.tree.values_in_use() == {}
    for s in range(n_seq(engine)):
        assert llama_cpp.llama_memory_seq_pos_max(engine._mem, s) == -1, s
    assert sorted(engine.slots.free_ids) == list(range(n_seq(engine)))
    assert await engine.flush_cache() == 0


async def test_flush_keeps_what_running_requests_use(engine, make_request, wait_until):
    await cold(engine, wait_until)
    base = make_request("base", user=SEA, max_tokens=4)
    await run(engine, base)
    await idle(engine, wait_until)
    agen = engine.generate(variant(base, "user", max_tokens=400))
    await first_chunks(agen, 2)
    n = len(base.prompt_token_ids)
    freed = await engine.flush_cache()
    total = engine.slots.tree.total_tokens
    assert total == n - 1 == engine.slots.tree.locked_tokens  # the running request's cached prefix stays
    assert freed > 0
    more = await first_chunks(agen, 4)  # and it keeps generating
    assert len(more) == 4
    await agen.aclose()
    await idle(engine, wait_until)
    assert_cells_agree(engine)


async def test_cache_holders_agree_with_llama_cpp_cells(engine, make_request, wait_until):
    """After shared prefixes, edge splits, a duplicate and a cancellation,
    each holder's llama.cpp cells span exactly its tree nodes."""
    await cold(engine, wait_until)
    reqs = [
        make_request("h1", user=SEA, max_tokens=6),
        make_request("h2", user=MOON, max_tokens=6),  # splits h1's edge after the shared template
        make_request("h3", user=SEA, max_tokens=10),  # extends h1's path
        make_request("h4", user=SEA, max_tokens=6),  # all cached: gives its id straight back
        make_request("h5", text=COUNT, max_tokens=6),
    ]
    for r in reqs:
        await run(engine, r)
        await idle(engine, wait_until)
        assert_cells_agree(engine)
    agen = engine.generate(make_request("h6", user=MOON, max_tokens=400))
    await first_chunks(agen, 3)
    await agen.aclose()
    await idle(engine, wait_until)
    assert_cells_agree(engine)
    assert len(engine.slots.tree.values_in_use()) >= 3
    await cold(engine, wait_until)
    assert_cells_agree(engine)


async def test_flush_after_a_request_finished_drops_its_prefix(fresh_engine, make_request, wait_until):
    eng = await fresh_engine(capacity=1)
    orig = eng._drain_inbox

    def drain_late(block: bool) -> None:
        # the engine thread is preempted between a step and the reap (as the
        # GIL allows): the caller reads the last chunk and asks for a flush
        if any(s.finished for s in list(eng._running)):
            end = time.monotonic() + 5
            while eng._inbox.empty() and time.monotonic() < end:
                time.sleep(0.002)
        orig(block)

    eng._drain_inbox = drain_late
    req = make_request("done", user=SEA, max_tokens=4)
    await run(eng, req)
    await eng.flush_cache()
    await idle(eng, wait_until)
    assert eng.slots.tree.total_tokens == 0
    assert usage(await run(eng, req)).cached_tokens == 0


async def test_flush_cache_on_a_stopped_engine_does_not_hang(fresh_engine):
    eng = await fresh_engine(capacity=1)
    await eng.stop()
    try:
        flushed = await asyncio.wait_for(eng.flush_cache(), 3)
    except Exception as exc:  # a clean error is fine, a hang is not
        assert not isinstance(exc, asyncio.TimeoutError), "flush_cache hung on a stopped engine"
    else:
        assert flushed == 0


# ------------------------------------------------------------------ cache off


async def test_prefix_cache_off_never_reuses_and_frees_everything(fresh_engine, make_request, wait_until):
    eng = await fresh_engine(capacity=2, prefix_cache=False)
    assert n_seq(eng) == 2
    assert len(eng.slots.free_ids) == 2
    req = make_request("off", user=SEA, max_tokens=8)
    first, second = await run(eng, req), await run(eng, req)
    both = await asyncio.gather(run(eng, req), run(eng, variant(req, "off2")))
    for chunks in (first, second, *both):
        assert usage(chunks).cached_tokens == 0
    assert ids_of(second) == ids_of(first)
    await idle(eng, wait_until)
    ld = eng.load()
    assert ld.kv_used == 0 and ld.cached_tokens_total == 0 and ld.evictions_total == 0
    assert eng.slots.tree.total_tokens == 0 and eng.slots.tree.nodes() == []
    assert sorted(eng.slots.free_ids) == [0, 1]
    for s in range(n_seq(eng)):
        assert pos_range(eng, s) == (-1, -1)
    assert await eng.flush_cache() == 0

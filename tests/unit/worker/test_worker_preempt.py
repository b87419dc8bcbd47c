"""Critical/interactive requests preempt batch work in the real embedded
engine (services/worker/preempt.py): an aborted batch step is rewound and
run again without changing the answer, a step serving latency-sensitive work
is never aborted, and an interactive prompt prefills in steps of its own.

Preemption is forced deterministically by raising the abort flag from a
thread in a tight loop, the way an interactive arrival raises it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading

import llama_cpp
import pytest
from fabric_testing import GENERATION_TIMEOUT as TIMEOUT, ids_of, run  # tests/ is on sys.path (tests/conftest.py)

from llmfabric.common.v1 import common_pb2

BATCH, INTERACTIVE = common_pb2.PRIORITY_BATCH, common_pb2.PRIORITY_INTERACTIVE


def prioritized(req, rid: str, priority: int):
    return dataclasses.replace(req, request_id=rid, priority=priority)


@contextlib.contextmanager
def hammering(engine):
    """Raise the engine's abort flag every millisecond until the block ends."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            engine._preemption.request()
            stop.wait(0.001)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


async def idle_accounting(engine, wait_until) -> None:
    await wait_until(lambda: engine.load().running == 0 and engine.load().waiting == 0, timeout=10, what="engine idle")
    await wait_until(lambda: engine.load().kv_used == engine.slots.tree.total_tokens, timeout=10, what="cells released")


async def test_an_aborted_batch_step_is_rerun_without_changing_the_answer(fresh_engine, make_request, wait_until):
    engine = await fresh_engine(capacity=2, prefix_cache=False)
    req = make_request("ref", user="Write a short poem about the sea.", max_tokens=24)
    reference = ids_of(await run(engine, prioritized(req, "ref", BATCH)))
    with hammering(engine):
        task = asyncio.create_task(run(engine, prioritized(req, "preempted", BATCH)))
        await wait_until(lambda: engine.preempted_steps >= 20, timeout=TIMEOUT, what="batch steps aborted")
    chunks = await asyncio.wait_for(task, TIMEOUT)
    assert ids_of(chunks) == reference
    assert chunks[-1].usage.completion_tokens == len(reference)
    await idle_accounting(engine, wait_until)


async def test_steps_serving_latency_sensitive_work_are_never_aborted(fresh_engine, make_request, wait_until):
    engine = await fresh_engine(capacity=2, prefix_cache=False)
    req = make_request("i", user="Write a short poem about the moon.", max_tokens=16)
    with hammering(engine):
        chunks = await asyncio.wait_for(run(engine, prioritized(req, "i", INTERACTIVE)), TIMEOUT)
        unspecified = await asyncio.wait_for(run(engine, prioritized(req, "u", 0)), TIMEOUT)  # UNSPECIFIED = interactive
    assert chunks[-1].usage.completion_tokens == 16 and ids_of(unspecified) == ids_of(chunks)
    assert engine.preempted_steps == 0


async def test_preemption_off_never_aborts(fresh_engine, make_request, wait_until):
    engine = await fresh_engine(capacity=2, prefix_cache=False, preempt=False)
    req = make_request("b", user="Name a color.", max_tokens=8)
    with hammering(engine):
        chunks = await asyncio.wait_for(run(engine, prioritized(req, "b", BATCH)), TIMEOUT)
    assert chunks[-1].finish is not None and engine.preempted_steps == 0


@pytest.fixture
def decode_calls(monkeypatch):
    """``decode_calls(engine)`` → a list that receives, per llama_decode call on
    that engine, ``{seq_id: tokens fed}``."""

    def install(engine) -> list[dict[int, int]]:
        calls, orig = [], llama_cpp.llama_decode

        def spy(ctx, batch):
            if ctx is engine._ctx:
                per: dict[int, int] = {}
                for i in range(batch.n_tokens):
                    per[batch.seq_id[i][0]] = per.get(batch.seq_id[i][0], 0) + 1
                calls.append(per)
            return orig(ctx, batch)

        monkeypatch.setattr(llama_cpp, "llama_decode", spy)
        return calls

    return install


async def test_an_interactive_prompt_prefills_without_batch_sequences(fresh_engine, make_request, decode_calls):
    engine = await fresh_engine(capacity=2, prefix_cache=False, prefill_chunk=16)
    calls = decode_calls(engine)
    batch_req = prioritized(make_request("b", user="Write a long story about a lighthouse.", max_tokens=200), "b", BATCH)
    stream = engine.generate(batch_req)
    try:
        await asyncio.wait_for(stream.__anext__(), TIMEOUT)  # the batch sequence is decoding
        batch_seq = engine._running[0].seq_id
        inter = prioritized(make_request("i", user="What is 2+2?", max_tokens=4), "i", INTERACTIVE)
        start = len(calls)
        chunks = await asyncio.wait_for(run(engine, inter), TIMEOUT)
    finally:
        await stream.aclose()
    assert chunks[-1].finish is not None
    prefill_steps = [c for c in calls[start:] if any(n > 1 for s, n in c.items() if s != batch_seq)]
    assert len(prefill_steps) >= 2, "the interactive prompt should take several 16-token chunks"
    assert all(batch_seq not in c for c in prefill_steps), "a batch sequence shared an interactive prefill step"
    assert any(batch_seq in c for c in calls[start:]), "the batch sequence should resume after the prefill"

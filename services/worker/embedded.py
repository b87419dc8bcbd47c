"""The embedded engine: llama.cpp in-process on the CPU.

One llama.cpp context holds up to ``capacity`` running sequences. A
dedicated thread runs the step loop: admit waiting requests between steps
(each takes its longest cached prefix from the radix cache, see
``kvcache.py``), build one ``llama_decode`` batch with one token for every
decoding sequence and a prompt chunk (at most ``prefill_chunk`` tokens) for
every prefilling one — so a long prompt joins without stalling running
streams —, sample per sequence with its own sampler chain, stream text out,
and hand finished or cancelled sequences' cells to the prefix cache at once.
Critical/interactive requests preempt batch work (``preempt.py``): they
abort a batch-only step in flight, are admitted first and prefill alone.
ctypes releases the GIL during ``llama_decode``, so the asyncio loop stays
responsive.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import AsyncIterator

import llama_cpp

from llmfabric.models.catalog import ModelSpec
from llmfabric.models.detok import IncrementalDetokenizer, StopMatcher
from llmfabric.models.gguf import GgufModel
from llmfabric.models.requant import requantized
from llmfabric.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from llmfabric.structs import Finish, TokenChunk, ValidatedRequest, latency_sensitive

from .engine import EngineInfo, EngineKind, EngineLoad
from .kvcache import SequenceSlots
from .preempt import Preemption
from .sampler import build_sampler, free_sampler
from .sequence import Sequence

log = logging.getLogger(__name__)


class EmbeddedEngine:
    """llama.cpp continuous-batching engine."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        context_length: int = 2048,
        capacity: int = 4,
        max_waiting: int = 64,
        n_batch: int = 512,
        n_threads: int = 1,
        n_threads_batch: int = 2,
        weights: str = "original",
        prefill_chunk: int = 128,
        prefix_cache: bool = True,
        cache_seqs: int = 64,
        preempt: bool = True,
    ) -> None:
        self.spec = spec
        self.info = EngineInfo(EngineKind.EMBEDDED, spec.name, context_length, capacity)
        self.max_waiting = max_waiting
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self.weights = weights
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.cache_seqs = cache_seqs
        self.preempt = preempt
        self._preemption: Preemption | None = None
        self.slots: SequenceSlots | None = None
        self.model: GgufModel | None = None
        self._ctx = None
        self._batch = None
        self._mem = None
        self._inbox: queue.Queue[Sequence] = queue.Queue()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prompt_total = 0

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await asyncio.to_thread(self._open)
        self._thread = threading.Thread(target=self._loop, name="llama-engine", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        self.model = GgufModel(requantized(self.spec.path, self.weights), vocab_only=False)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = self.info.context_length * self.info.capacity
        p.n_batch = self.n_batch
        p.n_ubatch = self.n_batch
        p.n_seq_max = self.info.capacity + (self.cache_seqs if self.prefix_cache else 0)
        p.n_threads = self.n_threads
        p.n_threads_batch = self.n_threads_batch
        if hasattr(p, "kv_unified"):
            p.kv_unified = True  # one cell pool shared by all sequences (prefix sharing needs it)
        self._ctx = llama_cpp.llama_init_from_model(self.model.handle, p)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, p.n_seq_max)
        self._preemption = Preemption(self._ctx, self.preempt)
        self.slots = SequenceSlots(
            self._mem, n_ctx=p.n_ctx, capacity=self.info.capacity, cache_seqs=self.cache_seqs, enabled=self.prefix_cache
        )
        log.info(
            "embedded engine ready",
            extra={"model": self.spec.name, "weights": self.weights, "n_ctx": p.n_ctx, "capacity": self.info.capacity},
        )

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._drain_inbox(block=False)  # anything submitted while the thread was exiting
        for seq in self._waiting:
            seq.emit(Unavailable("worker is shutting down"))
        self._waiting.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self.model is not None:
            self.model.close()

    # ---------------------------------------------------------- asyncio side
    async def generate(self, request: ValidatedRequest) -> AsyncIterator[TokenChunk]:
        if self.model is None or self._stop.is_set():
            raise Unavailable("engine is not running")
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.model.n_vocab]
        if bad:
            raise InvalidArgument(
                "request.prompt_token_ids", f"ids outside the vocabulary 0..{self.model.n_vocab - 1}: {bad[:5]}"
            )
        queued = self._inbox.qsize() + len(self._waiting) + 1  # with this one
        if queued - (self.info.capacity - len(self._running)) > self.max_waiting:
            raise ResourceExhausted(f"worker queue is full ({self.max_waiting} waiting)", retry_after_ms=500)
        loop = asyncio.get_running_loop()
        seq = Sequence(
            request=request,
            loop=loop,
            out=asyncio.Queue(),
            detok=IncrementalDetokenizer(self.model.piece),
            stops=StopMatcher(request.sampling.stop),
        )
        self._inbox.put(seq)
        if latency_sensitive(request.priority) and self._preemption is not None:
            self._preemption.request()
        done = False
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish is not None:
                    done = True
                    return
        finally:
            if not done:
                seq.cancelled.set()  # the engine thread frees the sequence at its next step

    def load(self) -> EngineLoad:
        slots = self.slots
        n_ctx = self.info.context_length * self.info.capacity
        used = slots.used(list(self._running)) if slots is not None else 0
        return EngineLoad(
            running=len(self._running),
            waiting=len(self._waiting) + self._inbox.qsize(),
            capacity=self.info.capacity,
            kv_used=used,
            kv_free=max(n_ctx - used, 0),
            prompt_tokens_total=self._prompt_total,
            cached_tokens_total=slots.cached_tokens_total if slots is not None else 0,
            evictions_total=slots.tree.evictions if slots is not None else 0,
        )

    @property
    def preempted_steps(self) -> int:
        """Batch-only steps aborted for latency-sensitive arrivals since start."""
        return self._preemption.preempted if self._preemption is not None else 0

    async def flush_cache(self) -> int:
        """Drop every cached prefix no running request uses (runs on the engine thread)."""
        if self._thread is None or not self._thread.is_alive() or self._stop.is_set():
            return 0  # not running: nothing is cached
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inbox.put(_Flush(done))
        return await done

    # ---------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._preemption.clear()  # arrivals from here on are seen by this iteration or abort its step
                self._drain_inbox(block=not self._running and not self._waiting)
                self._reap()
                self._admit()
                if self._running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - keep serving, fail the affected sequences
                log.exception("engine step failed")
                for seq in self._running:
                    seq.emit(Unavailable(f"engine failure: {exc}"))
                    self._release(seq, keep=False)  # its cells may be half-written: never cache them
                self._running.clear()
        self._drain_inbox(block=False)
        for seq in [*self._running, *self._waiting]:
            seq.emit(Unavailable("worker is shutting down"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            if block:
                self._take(self._inbox.get(timeout=0.05))
            while True:
                self._take(self._inbox.get_nowait())
        except queue.Empty:
            pass

    def _take(self, item: Sequence | _Flush) -> None:
        if isinstance(item, _Flush):
            self._reap()  # finished requests go into the tree first, so the flush drops them too
            n = self.slots.flush() if self.slots is not None else 0
            item.done.get_loop().call_soon_threadsafe(_resolve, item.done, n)
        else:
            self._waiting.append(item)

    def _reap(self) -> None:
        """Drop cancelled sequences (waiting or running) and free their cells."""
        for seq in [s for s in self._waiting if s.cancelled.is_set()]:
            self._waiting.remove(seq)
        for seq in [s for s in self._running if s.cancelled.is_set() or s.finished]:
            self._release(seq)  # release first: load() never under-reports the cells in use
            self._running.remove(seq)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.info.capacity:
            seq = next((s for s in self._waiting if latency_sensitive(s.request.priority)), self._waiting[0])
            if not self.slots.acquire(seq):
                break
            self._waiting.remove(seq)
            seq.sampler = build_sampler(seq.request.sampling)
            self._prompt_total += len(seq.prompt)
            self._running.append(seq)

    def _release(self, seq: Sequence, keep: bool = True) -> None:
        self.slots.release(seq, keep=keep)
        free_sampler(seq.sampler)
        seq.sampler = None
        if not seq.finished:
            seq.finish(Finish.CANCELLED, (), "")

    def _step(self) -> None:
        """One llama_decode over every running sequence (only the latency-sensitive ones while one of them prefills)."""
        batch, n = self._batch, 0
        sample_at: list[tuple[Sequence, int]] = []
        taken: list[tuple[Sequence, int]] = []
        active = self._running
        if any(s.prefilling and latency_sensitive(s.request.priority) for s in active):
            active = [s for s in active if latency_sensitive(s.request.priority)]
        decoding = sum(1 for s in active if not s.prefilling)
        budget = self.n_batch - decoding
        prefill = sum(min(len(s.prompt) - s.n_past, self.prefill_chunk) for s in active if s.prefilling)
        self.slots.make_room(decoding + min(budget, prefill), self._running)
        for seq in active:
            if seq.prefilling:
                take = min(len(seq.prompt) - seq.n_past, self.prefill_chunk, budget)
                if take <= 0 or not self.slots.make_room(take, self._running):
                    continue
                budget -= take
                tokens = seq.prompt[seq.n_past : seq.n_past + take]
                last_chunk = seq.n_past + take == len(seq.prompt)
            else:
                tokens, last_chunk = (seq.last_token,), True
            for j, tok in enumerate(tokens):
                batch.token[n] = tok
                batch.pos[n] = seq.n_past + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.seq_id
                batch.logits[n] = last_chunk and j == len(tokens) - 1
                n += 1
            seq.n_past += len(tokens)
            taken.append((seq, len(tokens)))
            if last_chunk:
                sample_at.append((seq, n - 1))
        if n == 0:
            return
        batch.n_tokens = n
        self._preemption.arm(not any(latency_sensitive(s.request.priority) for s, _ in taken))
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc == 1 and self.slots.tree.evict(n):  # no free cell run: free cached prefixes, retry once
            rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc == 2:  # preempted: llama.cpp dropped this ubatch's cells; run these tokens again later
            for seq, k in taken:
                seq.n_past -= k
            self._preemption.preempted += 1
            return
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for seq, idx in sample_at:
            if seq.cancelled.is_set():
                continue
            token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, idx)
            seq.accept(token, self.model.is_eog, self.info.context_length)


class _Flush:
    """A flush_cache request travelling through the engine thread's inbox."""

    def __init__(self, done: asyncio.Future) -> None:
        self.done = done


def _resolve(fut: asyncio.Future, value: int) -> None:
    if not fut.done():
        fut.set_result(value)

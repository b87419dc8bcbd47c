"""llama.cpp sequence ids and KV cells, shared through the radix prefix cache.

The context has one unified pool of ``n_ctx`` KV cells and ``n_seq_max =
capacity + cache_seqs`` sequence ids. A cell can belong to several sequence
ids at once, which is how prefixes are shared without copying:

* admitting a request takes a free sequence id, finds the longest cached
  prefix of its prompt (at least one prompt token is left to prefill, to get
  logits), tags those cells with the new id (``llama_memory_seq_cp`` per
  tree node) and pins the nodes (``lock``); only the rest is prefilled;
* when a request ends, its tokens whose KV exists go into the tree: the part
  already cached loses this id's tags (duplicate cells are freed), the new
  part becomes a node whose cells this sequence id keeps holding — the id
  becomes a *holder* and returns to the pool only when all its nodes are
  evicted;
* eviction (LRU leaves, never a pinned node) removes a node's tags from its
  holder (``llama_memory_seq_rm``) when cells or sequence ids run short.

Token accounting: cells in use = tokens in the tree + each running
sequence's own (not shared) tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import llama_cpp

from .radix import EvictionPolicy, RadixCache
from .sequence import Sequence

log = logging.getLogger(__name__)


class SequenceSlots:
    """Sequence-id pool + prefix cache over one llama.cpp memory."""

    def __init__(
        self,
        memory,
        *,
        n_ctx: int,
        capacity: int,
        cache_seqs: int,
        enabled: bool = True,
        policy: EvictionPolicy | str = EvictionPolicy.LRU,
    ) -> None:
        self.memory = memory
        self.n_ctx = n_ctx
        self.capacity = capacity
        self.enabled = enabled
        self.free_ids = list(range(capacity + (cache_seqs if enabled else 0)))[::-1]
        self.tree = RadixCache(on_evict=self._drop_cells, on_value_free=self.free_ids.append, policy=policy)
        self.cached_tokens_total = 0  # prompt tokens served from the cache

    # ------------------------------------------------------------- admission
    def acquire(self, seq: Sequence) -> bool:
        """Give ``seq`` a sequence id and its cached prefix; False when no id
        can be freed (everything is running)."""
        while not self.free_ids:
            if self.tree.evict(1) == 0:
                return False
        seq.seq_id = self.free_ids.pop()
        if not self.enabled:
            return True
        match = self.tree.match_prefix(_namespace(seq), seq.prompt[: len(seq.prompt) - 1])
        for node in match.node.path():
            llama_cpp.llama_memory_seq_cp(self.memory, node.value, seq.seq_id, node.start, node.end)
        self.tree.lock(match.node)
        seq.lock_node = match.node
        seq.n_past = seq.cached_tokens = match.length
        self.cached_tokens_total += match.length
        return True

    def release(self, seq: Sequence, keep: bool = True) -> None:
        """Hand ``seq``'s computed tokens to the tree (or free them all when
        ``keep`` is False or the cache is off)."""
        if seq.seq_id < 0:
            return
        sid, seq.seq_id = seq.seq_id, -1
        if seq.lock_node is not None:
            self.tree.unlock(seq.lock_node)
            seq.lock_node = None
        computed = (seq.prompt + tuple(seq.output_ids))[: seq.n_past]
        if self.enabled and keep and computed:
            cached = self.tree.insert(_namespace(seq), computed, sid)
            if cached < len(computed):
                # sid now holds the new node's cells; drop its tags on the shared part
                llama_cpp.llama_memory_seq_rm(self.memory, sid, 0, cached)
                return
        llama_cpp.llama_memory_seq_rm(self.memory, sid, -1, -1)
        self.free_ids.append(sid)

    # ------------------------------------------------------------- cells
    def used(self, running: Iterable[Sequence]) -> int:
        return self.tree.total_tokens + sum(s.n_past - s.cached_tokens for s in running)

    def make_room(self, need: int, running: Iterable[Sequence]) -> bool:
        """Evict until ``need`` more cells fit; False if they cannot."""
        short = self.used(running) + need - self.n_ctx
        if short > 0:
            self.tree.evict(short)
        return self.used(running) + need <= self.n_ctx

    def flush(self) -> int:
        return self.tree.flush()

    def _drop_cells(self, holder: int, start: int, end: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, holder, start, end)


def _namespace(seq: Sequence) -> tuple[str, str, str]:
    """Cache keys never cross models, tenants or cache salts."""
    r = seq.request
    return (r.model, r.tenant_id, r.cache_salt)

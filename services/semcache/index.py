"""Vector indexes of the semantic cache: one per namespace, over 384-d embeddings, keyed by our own int64 ids.

Vectors are L2-normalised on the way in, so a similarity is a cosine. Not thread-safe: the caller serialises.
Measured by ``loadtest/bench_index.py`` (2 cores, 1 thread): exact search (matrix @ vector) costs ~0.25 ms at
8k entries but ~18 ms at 100k (memory bound); hnswlib HNSW costs ~0.25 ms at 100k with recall@1 = 1.0, but an
insert costs ~0.4 ms (a build ~0.5 ms per entry) and reusing a removed entry's slot ~4.5 ms (hnswlib re-links
the neighbourhood). Most namespaces are small, so ``auto`` (the default) is exact until ``threshold`` entries,
then migrates to HNSW (a one-time build: ~2 s at 8k), and back to exact below ``threshold // 2``.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

import hnswlib
import numpy as np

DEFAULT_THRESHOLD = 8_000  # entries: about where HNSW search overtakes exact (~0.25 ms each; bench_index.py)
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class IndexKind(str, Enum):
    EXACT = "exact"  # brute force over a contiguous matrix: perfect recall, O(N) per search
    HNSW = "hnsw"  # hnswlib graph: sub-millisecond at 100k+, approximate
    AUTO = "auto"  # exact while small, HNSW past a threshold


class VectorIndex(Protocol):
    dim: int

    def add(self, key: int, vector: np.ndarray) -> None: ...  # adds, or replaces the vector of an existing key
    def remove(self, key: int) -> bool: ...  # False if the key was not there
    def search(self, vector: np.ndarray, k: int = 1) -> list[tuple[int, float]]: ...  # (key, cosine), best first
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...


def _unit(vector: np.ndarray, dim: int) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32)
    if v.shape != (dim,):
        raise ValueError(f"vector has shape {v.shape}; this index holds {dim}-d vectors (dim={dim})")
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("vector must be finite and non-zero")
    return v / norm


def _key(key: int) -> int:
    k = int(key)
    if not _I64_MIN <= k <= _I64_MAX:
        raise ValueError(f"key {k} is not an int64")
    return k


def _check_k(k: int) -> int:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def _top_k(keys: np.ndarray, sims: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (key, similarity) pairs, best first, by exhaustive scores."""
    if k == 1 and len(sims):
        top = [int(np.argmax(sims))]
    else:
        top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
        top = top[np.argsort(-sims[top], kind="stable")]
    return [(int(keys[i]), float(sims[i])) for i in top]


class ExactIndex:
    """Rows of a contiguous float32 matrix; remove swaps the last row into the hole; capacity doubles and halves."""

    MIN_CAPACITY = 64

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._vecs = np.empty((self.MIN_CAPACITY, dim), np.float32)
        self._keys = np.empty(self.MIN_CAPACITY, np.int64)
        self._rows: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def add(self, key: int, vector: np.ndarray) -> None:
        v, key = _unit(vector, self.dim), _key(key)
        row = self._rows.get(key)
        if row is None:
            row = len(self._rows)
            if row == len(self._keys):
                self._resize(2 * row)
            self._rows[key], self._keys[row] = row, key
        self._vecs[row] = v

    def remove(self, key: int) -> bool:
        row = self._rows.pop(key, None)
        if row is None:
            return False
        last = len(self._rows)
        if row != last:  # move the last row into the hole
            self._vecs[row], self._keys[row] = self._vecs[last], self._keys[last]
            self._rows[int(self._keys[row])] = row
        if len(self._keys) > self.MIN_CAPACITY and last < len(self._keys) // 4:
            self._resize(len(self._keys) // 2)
        return True

    def search(self, vector: np.ndarray, k: int = 1) -> list[tuple[int, float]]:
        v, n = _unit(vector, self.dim), len(self._rows)
        return _top_k(self._keys[:n], self._vecs[:n] @ v, _check_k(k))

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, vectors) of the live entries, copies."""
        n = len(self._rows)
        return self._keys[:n].copy(), self._vecs[:n].copy()

    def _resize(self, capacity: int) -> None:
        n = len(self._rows)
        vecs, keys = np.empty((capacity, self.dim), np.float32), np.empty(capacity, np.int64)
        vecs[:n], keys[:n] = self._vecs[:n], self._keys[:n]
        self._vecs, self._keys = vecs, keys


class HnswIndex:
    """hnswlib graph over dense labels 0..slots-1 (label -> key in an array). A removed key's label is marked
    deleted (never returned) and reused by the next new key, so slots never exceed the peak size; when deleted
    labels outnumber live ones (and ``min_compact``), the graph is rebuilt from the live vectors."""

    def __init__(self, dim: int, capacity: int = 1024, m: int = 16, ef_construction: int = 100, ef_search: int = 64,
                 min_compact: int = 1024) -> None:
        self.dim, self.m, self.ef_construction, self.ef_search = dim, m, ef_construction, ef_search
        self.min_capacity, self.min_compact = max(capacity, 16), min_compact
        self._reset(self.min_capacity)

    def _reset(self, capacity: int) -> None:
        self._ix = hnswlib.Index(space="ip", dim=self.dim)
        self._ix.init_index(max_elements=capacity, M=self.m, ef_construction=self.ef_construction)
        self._ix.set_ef(self.ef_search)
        self._ix.set_num_threads(1)
        self._labels: dict[int, int] = {}  # key -> label
        self._keys = np.zeros(capacity, np.int64)  # label -> key
        self._free: list[int] = []  # labels marked deleted, to reuse
        self._slots = 0  # labels ever used (live + free)

    @property
    def capacity(self) -> int:
        return self._ix.get_max_elements()

    @property
    def slots(self) -> int:
        return self._slots

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, key: object) -> bool:
        return key in self._labels

    def add(self, key: int, vector: np.ndarray) -> None:
        v, key = _unit(vector, self.dim), _key(key)
        self.add_many(np.array([key], np.int64), v[None])

    def add_many(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Bulk add of unique keys with normalised vectors (a migration or a load): one hnswlib call."""
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"vectors have shape {vectors.shape}; expected ({len(keys)}, {self.dim}) (dim={self.dim})")
        labels = np.empty(len(keys), np.int64)
        for i, key in enumerate(keys.tolist()):
            label = self._labels.get(key)
            if label is None:
                if self._free:
                    label = self._free.pop()
                    self._ix.unmark_deleted(label)  # the update below re-links it
                else:
                    label, self._slots = self._slots, self._slots + 1
                    if label >= self.capacity:
                        self._grow(max(2 * self.capacity, self._slots + len(keys) - i))
                self._labels[key], self._keys[label] = label, key
            labels[i] = label
        self._ix.add_items(vectors, labels, num_threads=1)

    def remove(self, key: int) -> bool:
        label = self._labels.pop(key, None)
        if label is None:
            return False
        self._ix.mark_deleted(label)
        self._free.append(label)
        if len(self._free) > max(len(self._labels), self.min_compact):
            self._compact()
        return True

    def search(self, vector: np.ndarray, k: int = 1) -> list[tuple[int, float]]:
        v, k = _unit(vector, self.dim), min(_check_k(k), len(self._labels))
        if k == 0:
            return []
        try:
            labels, dists = self._ix.knn_query(v, k=k, num_threads=1)
        except RuntimeError:  # fewer than k live nodes reached (never seen at the defaults): exhaustive instead
            keys, vecs = self.items()
            return _top_k(keys, vecs @ v, k)
        return [(int(self._keys[lb]), 1.0 - float(d)) for lb, d in zip(labels[0], dists[0])]

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, vectors) of the live entries."""
        keys = np.fromiter(self._labels.keys(), np.int64, len(self._labels))
        labels = list(self._labels.values())
        vecs = self._ix.get_items(labels) if labels else np.empty((0, self.dim), np.float32)
        return keys, np.asarray(vecs, np.float32).reshape(-1, self.dim)

    def _grow(self, capacity: int) -> None:
        self._ix.resize_index(capacity)
        self._keys = np.concatenate([self._keys, np.zeros(capacity - len(self._keys), np.int64)])

    def _compact(self) -> None:
        keys, vecs = self.items()
        self._reset(max(self.min_capacity, 2 * len(keys)))
        if len(keys):
            self.add_many(keys, vecs)


class AutoIndex:
    """Exact below ``threshold`` entries, HNSW above; back to exact below ``threshold // 2`` (hysteresis)."""

    def __init__(self, dim: int, threshold: int = DEFAULT_THRESHOLD, **hnsw: int) -> None:
        self.dim, self.threshold, self._hnsw = dim, threshold, hnsw
        self._ix: ExactIndex | HnswIndex = ExactIndex(dim)

    @property
    def kind(self) -> IndexKind:
        return IndexKind.HNSW if isinstance(self._ix, HnswIndex) else IndexKind.EXACT

    def __len__(self) -> int:
        return len(self._ix)

    def __contains__(self, key: object) -> bool:
        return key in self._ix

    def add(self, key: int, vector: np.ndarray) -> None:
        self._ix.add(key, vector)
        if isinstance(self._ix, ExactIndex) and len(self._ix) > self.threshold:
            keys, vecs = self._ix.items()
            self._ix = HnswIndex(self.dim, capacity=2 * len(keys), **self._hnsw)
            self._ix.add_many(keys, vecs)

    def remove(self, key: int) -> bool:
        removed = self._ix.remove(key)
        if isinstance(self._ix, HnswIndex) and len(self._ix) < self.threshold // 2:
            keys, vecs = self._ix.items()
            self._ix = ExactIndex(self.dim)
            for k, v in zip(keys.tolist(), vecs):
                self._ix.add(k, v)
        return removed

    def search(self, vector: np.ndarray, k: int = 1) -> list[tuple[int, float]]:
        return self._ix.search(vector, k)


def create_index(kind: IndexKind | str, dim: int, **params: int) -> VectorIndex:
    """A new, empty index; ``params`` go to the class (``threshold`` for auto, ``m``/``ef_search``… for hnsw)."""
    kind = IndexKind(kind)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if kind is IndexKind.EXACT:
        return ExactIndex(dim, **params)
    if kind is IndexKind.HNSW:
        return HnswIndex(dim, **params)
    return AutoIndex(dim, **params)

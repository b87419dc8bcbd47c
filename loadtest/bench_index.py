"""Vector-index benchmark for the semantic cache: which index, and from what size (services/semcache/index.py).

Data: L2-normalised 384-d float32 vectors (all-MiniLM-L6-v2's shape), 1,000 random cluster centres + Gaussian noise
(a stored point has cosine ~0.7 to its centre, ~0.5 to a neighbour in its cluster). Queries: "near" = a stored point
plus noise (cosine ~0.88 to it: a paraphrase, what a cache hit looks like) and "fresh" = a new point of a cluster
(a miss; its nearest neighbour is ambiguous, the hard case for an ANN index).

Each (candidate, size) runs in its own subprocess, single-threaded (OPENBLAS/OMP threads = 1, libraries told 1
thread), so the RSS delta of a build is that index alone. Per case:
  build s      bulk insert of N vectors (the auto index's migration cost, and a restart's rebuild)
  add/rm µs    p50 of adding one new key / removing one key
  p50/p99 µs   top-1 search of one query vector
  rec near/fresh  recall@1 against exact search
  churn op     p50 µs of replacing one key (remove + add of a new one), repeated for 30 % of the keys: the
               steady state of a full cache (TTL expiry / LRU eviction + new answers)
  churn p50/rec   then: search p50, near recall against exact over the live keys
  slots/N      index slots after churn / N (does memory stay bounded under churn?)
  dead         removed keys that a search returned after churn (must be 0)
  RSS MB       resident-memory delta of the build (raw vectors alone: N x 1.5 KB)
Bar: semcache lookup p50 <= 5 ms at 100k entries including ~3 ms of query embedding -> search <~ 1 ms p50.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/faiss load their pools
    os.environ[_v] = "1"

import argparse, importlib, json, pathlib, subprocess, sys, time  # noqa: E401,E402

import numpy as np  # noqa: E402

from benchlib import pct, save, table  # noqa: E402  (loadtest/ is on sys.path when run as a script)

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench_index.json"
DIM, CENTRES, NOISE, QNOISE = 384, 1000, 0.05, 0.03
M, EF_CONSTRUCTION, EF_SEARCH = 16, 100, 64  # the same graph parameters for every HNSW candidate
SEARCH_BAR_US = 1000.0


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    return unit(centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, DIM), dtype=np.float32) * NOISE)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- candidates: add(keys, matrix) in bulk, add_one, remove_one, search(vector) -> best key, slots() -------------------

class Ours:
    """llmfabric.semcache.index (the product): kind exact, hnsw or auto."""
    kind, module = "", "llmfabric.semcache.index"

    def __init__(self, cap: int):
        from llmfabric.semcache.index import create_index
        self.ix = create_index(self.kind, DIM)

    def add(self, keys, x):
        if hasattr(self.ix, "add_many"):
            self.ix.add_many(keys, x)
        else:
            for k, v in zip(keys.tolist(), x):
                self.ix.add(k, v)

    def add_one(self, k, v):
        self.ix.add(k, v)

    def remove_one(self, k):
        self.ix.remove(k)

    def search(self, v):
        return self.ix.search(v)[0][0]

    def slots(self):
        ix = self.ix._ix if self.kind == "auto" else self.ix  # auto -> the index it holds now
        return ix.slots if hasattr(ix, "slots") else len(ix._keys)  # exact: rows allocated


class Exact(Ours):
    """exact numpy: contiguous float32 matrix, swap-remove; search = matrix @ vector + argmax."""
    kind = "exact"


class Hnsw(Ours):
    """hnswlib behind our wrapper: dense labels, mark_deleted + label reuse, compaction when deleted > live."""
    kind = "hnsw"


class Auto(Ours):
    """exact until the default threshold, then hnsw (the build counts the migration)."""
    kind = "auto"


class Hnswlib:
    """hnswlib: mark_deleted + allow_replace_deleted (a new key reuses a deleted slot), resize_index on growth."""
    module = "hnswlib"

    def __init__(self, cap: int):
        import hnswlib
        self.ix = hnswlib.Index(space="ip", dim=DIM)
        self.ix.init_index(max_elements=cap, M=M, ef_construction=EF_CONSTRUCTION, allow_replace_deleted=True)
        self.ix.set_ef(EF_SEARCH)
        self.ix.set_num_threads(1)

    def add(self, keys, x):
        self.ix.add_items(x, keys, num_threads=1)

    def add_one(self, k, v):
        if self.ix.get_current_count() == self.ix.get_max_elements() and not self.ix.element_count_deleted():
            self.ix.resize_index(2 * self.ix.get_max_elements())
        self.ix.add_items(v[None], [k], num_threads=1, replace_deleted=True)

    def remove_one(self, k):
        self.ix.mark_deleted(k)

    def search(self, v):
        return int(self.ix.knn_query(v, k=1, num_threads=1)[0][0, 0])

    def slots(self):
        return self.ix.get_current_count()


class _Faiss:
    module = "faiss"

    def __init__(self, cap: int):
        import faiss
        faiss.omp_set_num_threads(1)
        self.faiss, self.ix = faiss, faiss.IndexIDMap2(self.make(faiss))

    def add(self, keys, x):
        self.ix.add_with_ids(x, keys)

    def add_one(self, k, v):
        self.ix.add_with_ids(v[None], np.array([k], np.int64))

    def remove_one(self, k):
        self.ix.remove_ids(np.array([k], np.int64))

    def search(self, v):
        return int(self.ix.search(v[None], 1)[1][0, 0])

    def slots(self):
        return self.ix.ntotal


class FaissFlat(_Faiss):
    """faiss IndexIDMap2(IndexFlatIP): exact; remove_ids compacts the arrays (O(N))."""
    churn_cap = 2000  # remove_ids is O(N): 30 % churn at 100k would take minutes

    def make(self, faiss):
        return faiss.IndexFlatIP(DIM)


class FaissHnsw(_Faiss):
    """faiss IndexIDMap2(IndexHNSWFlat): no remove_ids (deletion needs an IDSelector at search + rebuilds)."""
    removes = False

    def make(self, faiss):
        ix = faiss.IndexHNSWFlat(DIM, M, faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efConstruction, ix.hnsw.efSearch = EF_CONSTRUCTION, EF_SEARCH
        return ix


class USearch:
    """usearch Index: native remove (tombstone, slot reused), uint64 keys, grows by itself."""
    dtype, module = "f32", "usearch.index"

    def __init__(self, cap: int):
        from usearch.index import Index
        self.ix = Index(ndim=DIM, metric="ip", dtype=self.dtype, connectivity=M, expansion_add=EF_CONSTRUCTION,
                        expansion_search=EF_SEARCH)

    def add(self, keys, x):
        self.ix.add(keys.astype(np.uint64), x, threads=1)

    def add_one(self, k, v):
        self.ix.add(k, v)

    def remove_one(self, k):
        self.ix.remove(k)

    def search(self, v):
        return int(self.ix.search(v, 1, threads=1).keys[0])

    def slots(self):
        return self.ix.capacity  # slots allocated (removed slots are reused)


class USearchF16(USearch):
    """usearch with float16 storage (half the memory; recall may drop)."""
    dtype = "f16"


CANDIDATES = {"exact": Exact, "faiss-flat": FaissFlat, "hnswlib": Hnswlib, "faiss-hnsw": FaissHnsw,
              "usearch": USearch, "usearch-f16": USearchF16, "hnsw": Hnsw, "auto": Auto}


def timed(fn, items) -> tuple[list[float], list]:
    """µs per call, and the results."""
    us, got = [], []
    for it in items:
        t = time.perf_counter_ns()
        got.append(fn(it))
        us.append((time.perf_counter_ns() - t) / 1e3)
    return us, got


def run_case(name: str, n: int, n_queries: int, seed: int = 0) -> dict:
    """One candidate at one size, in this (fresh) process."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((CENTRES, DIM), dtype=np.float32))
    x = clustered(n, rng, centres)
    keys = rng.choice(2**62, n, replace=False).astype(np.int64)  # our own int64 keys, not 0..n-1
    src = rng.integers(0, n, n_queries)
    near = unit(x[src] + rng.standard_normal((n_queries, DIM), dtype=np.float32) * QNOISE)
    fresh = clustered(n_queries, rng, centres)
    extra = clustered(1000, rng, centres)
    extra_keys = rng.choice(2**62, len(extra), replace=False).astype(np.int64) + 2**62
    cls = CANDIDATES[name]
    importlib.import_module(cls.module)  # the library's own load is not the index's memory
    before = rss_mb()
    t = time.perf_counter()
    ix = cls(n + len(extra))
    ix.add(keys, x)
    build_s = time.perf_counter() - t
    rss = rss_mb() - before
    for q in near[:50]:  # warm-up
        ix.search(q)
    lat_near, got_near = timed(ix.search, near)
    lat_fresh, got_fresh = timed(ix.search, fresh)
    rec_near = float(np.mean(np.array(got_near) == keys[np.argmax(near @ x.T, axis=1)]))
    rec_fresh = float(np.mean(np.array(got_fresh) == keys[np.argmax(fresh @ x.T, axis=1)]))
    lat = lat_near + lat_fresh
    n_one = min(200, n // 2)
    add_us = timed(lambda i: ix.add_one(int(extra_keys[i]), extra[i]), range(n_one))[0]
    res = {"candidate": name, "n": n, "build_s": build_s, "rss_mb": rss, "search_us": lat,
           "recall_near": rec_near, "recall_fresh": rec_fresh, "add_us": add_us}
    if getattr(cls, "removes", True):
        res["remove_us"] = timed(lambda i: ix.remove_one(int(extra_keys[i])), range(n_one))[0]
        # churn: replace 30 % of the keys one by one (TTL expiry / eviction + new answers); then search the live set
        live_x, live_k = x.copy(), keys.copy()
        n_churn = min(int(0.3 * n), getattr(cls, "churn_cap", n))
        gone = rng.choice(n, n_churn, replace=False)
        new_x = clustered(n_churn, rng, centres)
        new_k = rng.choice(2**62, n_churn, replace=False).astype(np.int64)  # collision odds ~n²/2^62: none
        churn_op_us = []
        for i, j in enumerate(gone):
            t = time.perf_counter_ns()
            ix.remove_one(int(live_k[j]))
            ix.add_one(int(new_k[i]), new_x[i])
            churn_op_us.append((time.perf_counter_ns() - t) / 1e3)
            live_x[j], live_k[j] = new_x[i], new_k[i]
        src = rng.integers(0, n, n_queries)
        q2 = unit(live_x[src] + rng.standard_normal((n_queries, DIM), dtype=np.float32) * QNOISE)
        truth = live_k[np.argmax(q2 @ live_x.T, axis=1)]
        churn_us, got = timed(ix.search, q2)
        res.update(churn_ops=n_churn, churn_op_us=churn_op_us, churn_search_us=churn_us,
                   churn_recall_near=float(np.mean(np.array(got) == truth)), churn_slots_ratio=ix.slots() / n,
                   churn_dead_returned=len(set(got) & set(keys[gone].tolist())))
    return res


def summary_row(r: dict) -> list:
    s, na = r["search_us"], "n/a"
    return [r["candidate"], r["n"], f"{r['build_s']:.2f}", pct(r["add_us"], 50),
            pct(r["remove_us"], 50) if "remove_us" in r else na, pct(s, 50), pct(s, 99),
            f"{r['recall_near']:.3f}", f"{r['recall_fresh']:.3f}",
            pct(r["churn_op_us"], 50) if "churn_op_us" in r else na,
            pct(r["churn_search_us"], 50) if "churn_search_us" in r else na,
            f"{r['churn_recall_near']:.3f}" if "churn_recall_near" in r else na,
            f"{r['churn_slots_ratio']:.2f}" if "churn_slots_ratio" in r else na,
            r.get("churn_dead_returned", na), r["rss_mb"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1k and 10k entries, 300 queries")
    ap.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], help="e.g. 1000,10000,100000")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated, of: " + ",".join(CANDIDATES))
    ap.add_argument("--queries", type=int, help="queries per kind (default 1000, --quick 300)")
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--case", nargs=2, metavar=("CANDIDATE", "N"), help=argparse.SUPPRESS)  # internal: one subprocess
    args = ap.parse_args()
    n_queries = args.queries or (300 if args.quick else 1000)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), n_queries)))
        return
    sizes = args.sizes or ([1000, 10000] if args.quick else [1000, 10000, 100000])
    load_before, t0, results = os.getloadavg(), time.monotonic(), []
    for n in sizes:
        for name in args.candidates.split(","):
            p = subprocess.run([sys.executable, __file__, "--case", name, str(n), "--queries", str(n_queries)],
                               capture_output=True, text=True, check=False)
            if p.returncode:
                sys.exit(f"{name} n={n} failed:\n{p.stderr}")
            results.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"  {name} n={n}: done ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    res = {"machine": {"nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
           "params": {"dim": DIM, "centres": CENTRES, "noise": NOISE, "query_noise": QNOISE, "queries": n_queries,
                      "M": M, "ef_construction": EF_CONSTRUCTION, "ef_search": EF_SEARCH, "threads": 1},
           "elapsed_s": time.monotonic() - t0, "results": results}
    m = res["machine"]
    print(f"\nllmfabric vector-index benchmark; {m['nproc']} cpus, load avg {m['loadavg_before'][0]:.2f} -> "
          f"{m['loadavg_after'][0]:.2f}; {DIM}-d, 1 thread, HNSW M={M} efC={EF_CONSTRUCTION} ef={EF_SEARCH}, "
          f"{n_queries} near + {n_queries} fresh queries; elapsed {res['elapsed_s']:.0f} s\n")
    table(["candidate", "N", "build s", "add µs", "rm µs", "p50 µs", "p99 µs", "rec near", "rec fresh",
           "churn op", "churn p50", "churn rec", "slots/N", "dead", "RSS MB"], [summary_row(r) for r in results])
    big = [r for r in results if r["n"] == max(sizes)]
    ok = [r["candidate"] for r in big if pct(r["search_us"], 50) <= SEARCH_BAR_US and "remove_us" in r]
    print(f"\nsearch p50 <= {SEARCH_BAR_US:.0f} µs at N={max(sizes)} with deletions: {', '.join(ok) or 'none'}")
    save(res, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

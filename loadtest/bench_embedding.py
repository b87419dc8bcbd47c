"""Query-embedding benchmark: all-MiniLM-L6-v2 on ONNX Runtime + tokenizers, in-process.

1  single query: ms per embed([q]) (tokenize + ORT run) over ~500 warm queries of varied length (the paraphrase
   set's questions, a fifth of them joined 2-4 at a time), threads=1 and threads=2 alternating by blocks of 100
   queries so both see the same machine load; p50/p99 overall and by token count.
   Target: p50 <= 5 ms (DESIGN measured 2.7 ms); verdict per thread count, threads=1 being the semcache default.
2  batch of 16: texts/s and ms per embed(16 queries) for both thread counts, alternating by blocks of 10.
The host is shared: compare numbers within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import time

from llmfabric.semcache.embedding import Embedder

from benchlib import pct, save, table  # loadtest/ is on sys.path when run as a script

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "bench_embedding.json"
DATA = HERE / "data" / "paraphrases.jsonl"
TARGET_MS = 5.0
THREADS = (1, 2)
BLOCK = 100  # queries per config before switching to the other (batches: BLOCK // 10)
BUCKETS = ((1, 16), (17, 32), (33, 64), (65, 256))


def queries(n: int, seed: int = 0) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    base = sorted({r[k] for r in rows for k in ("a", "b")})
    rnd = random.Random(seed)
    return [rnd.choice(base) if rnd.random() < 0.8 else " ".join(rnd.sample(base, rnd.randint(2, 4))) for _ in range(n)]


def ms(f, *a) -> float:
    t = time.perf_counter()
    f(*a)
    return (time.perf_counter() - t) * 1e3


def run(args) -> dict:
    embs = {t: Embedder(threads=t) for t in THREADS}
    tok = embs[1].tokenizer
    qs = queries(args.queries)
    lengths = [len(tok.encode(q).ids) for q in qs]
    for e in embs.values():  # warm-up: ORT allocates per shape on first use
        for q in qs[:50]:
            e.embed([q])
    load_before = os.getloadavg()
    single = {t: [] for t in THREADS}
    batch = {t: [] for t in THREADS}
    batches = [qs[i:i + 16] for i in range(0, len(qs) - 15, 16)][:args.batches]
    for i in range(0, len(qs), BLOCK):  # configs alternate by blocks, not query by query: a run
        for t, e in embs.items():          # right after another session's run measures their overlap
            single[t] += [ms(e.embed, [q]) for q in qs[i:i + BLOCK]]
    for i in range(0, len(batches), BLOCK // 10):
        for t, e in embs.items():
            batch[t] += [ms(e.embed, b) for b in batches[i:i + BLOCK // 10]]
    tokenize = [ms(tok.encode, q) for q in qs]
    res = {"target_ms": TARGET_MS, "queries": len(qs), "tokens": {"p50": pct(lengths, 50), "max": max(lengths)},
           "onnx": str(embs[1].path), "single": {}, "batch16": {},
           "tokenize_ms": {"p50": pct(tokenize, 50), "p99": pct(tokenize, 99)}}
    for t in THREADS:
        s = single[t]
        by_len = {}
        for lo, hi in BUCKETS:
            xs = [x for x, n in zip(s, lengths) if lo <= n <= hi]
            if xs:
                by_len[f"{lo}-{hi}"] = {"n": len(xs), "min": min(xs), "p50": pct(xs, 50), "p99": pct(xs, 99)}
        res["single"][t] = {"min": min(s), "p50": pct(s, 50), "p99": pct(s, 99), "mean": sum(s) / len(s),
                            "by_tokens": by_len, "samples": s}
        b = batch[t]
        res["batch16"][t] = {"batches": len(b), "p50_ms": pct(b, 50), "texts_per_s": 16 * len(b) / (sum(b) / 1e3),
                             "samples": b}
    res["pass"] = {t: res["single"][t]["p50"] <= TARGET_MS for t in THREADS}
    res["machine"] = {"nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                      "platform": platform.platform(), "python": platform.python_version()}
    return res


def report(res: dict) -> None:
    print(f"\n1  single query, {res['queries']} warm queries (tokens p50 {res['tokens']['p50']:.0f}, "
          f"max {res['tokens']['max']}); tokenize alone p50 {res['tokenize_ms']['p50'] * 1e3:.0f} µs")
    rows = []
    for t, s in res["single"].items():
        rows.append([f"threads={t}", "all", len(s["samples"]), s["min"], s["p50"], s["p99"]])
        rows += [["", f"{k} tok", v["n"], v["min"], v["p50"], v["p99"]] for k, v in s["by_tokens"].items()]
    table(["config", "length", "n", "min ms", "p50 ms", "p99 ms"], rows)
    print("\n2  batch of 16")
    table(["config", "batches", "p50 ms", "texts/s"],
          [[f"threads={t}", b["batches"], b["p50_ms"], b["texts_per_s"]] for t, b in res["batch16"].items()])
    print(f"\ntarget: single-query p50 <= {res['target_ms']:.0f} ms (load average before/after: "
          f"{res['machine']['loadavg_before'][0]:.2f} / {res['machine']['loadavg_after'][0]:.2f})")
    for t, ok in res["pass"].items():
        default = "  (the semcache default)" if t == 1 else ""
        print(f"  threads={t}: {res['single'][t]['p50']:.2f} ms -> {'PASS' if ok else 'FAIL'}{default}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=500, help="single queries per thread count (default 500)")
    ap.add_argument("--batches", type=int, default=30, help="batches of 16 per thread count (default 30)")
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = ap.parse_args()
    res = run(args)
    report(res)
    save(res, args.out)
    print(f"raw samples and summary: {args.out}")


if __name__ == "__main__":
    main()

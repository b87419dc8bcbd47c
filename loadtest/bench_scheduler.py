"""Scheduler benchmark: overhead, priority isolation and cache-aware routing (see loadtest/README.md).

1  overhead: real scheduler + 2 real worker gRPC servers with a zero-cost engine, in-process; Submit vs the worker's
   Generate (baseline), interleaved: µs per request at concurrency 1, requests/s at concurrency 32.
2  priority: real stack, 1 embedded worker; interactive TTFT unloaded, under a PRIORITY_BATCH flood (3 x capacity
   streams) and with capacity - 1 batch streams. Bar: flood p99 <= 1.5x unloaded. Running sequences are not preempted.
3  routing: 2 embedded workers, round_robin vs cache_aware (fresh stack each, order alternating per round), same
   shared-prefix request list, concurrency 4. The system prompts (~3,900 tokens) outgrow one worker's KV (2,048 cells at
   --ctx 512) but fit in both: the case cache-aware routing exists for. Bar: cache-aware >= 1.5x round-robin requests/s.
"""

from __future__ import annotations

import argparse, asyncio, contextlib, os, pathlib, platform, random, shutil, sys, tempfile, time, urllib.request  # noqa: E401
from statistics import median

import grpc

from llmfabric.cli.processes import free_port
from llmfabric.cli.stack import Stack, StackOptions
from llmfabric.common.v1 import common_pb2
from llmfabric.scheduler.config import SchedulerConfig
from llmfabric.scheduler.server import create_server as create_scheduler
from llmfabric.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from llmfabric.structs import Finish, TokenChunk, Usage
from llmfabric.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from llmfabric.worker.config import WorkerConfig
from llmfabric.worker.engine import EngineInfo, EngineKind, EngineLoad
from llmfabric.worker.server import create_server as create_worker
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc

from benchlib import pct, save, table  # loadtest/ is on sys.path when run as a script

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench_scheduler.json"
BARS = {"priority_p99_ratio_max": 1.5, "cache_aware_throughput_ratio_min": 1.5}
BATCH_CHAT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
INTERACTIVE = ["What is 2+2?", "Name a color.", "Say hello.", "What day follows Monday?", "Name a fruit."]
QUESTIONS = ["How do I reset my password?", "Can I get a refund?", "What are your opening hours?", "Is my data safe?",
             "How do I cancel my plan?", "Do you ship abroad?", "How do I contact a human?", "Can I change my order?"]
COMPANIES = ["Acme Storage", "Birch Bank", "Cobalt Telecom", "Dune Travel", "Ember Foods", "Fjord Energy", "Garnet Games",
             "Harbor Insurance", "Iris Optics", "Juniper Health", "Kestrel Airlines", "Lumen Books", "Maple Motors"]
SESSION = [("My order has not arrived yet.", "I am sorry to hear that. Could you tell me your order number?"),
           ("It is 48213.", "Thank you. Order 48213 left our warehouse three days ago and is with the courier."),
           ("When will it arrive?", "The courier expects to deliver it within two business days."),
           ("Can I change the delivery address?", "Yes, you can change it from the tracking page until it ships out.")]
RULES = ("Rules: 1. Be friendly, calm and professional; address the customer directly, never blame them, avoid jargon, "
         "and explain any unavoidable technical term in one short sentence. 2. Answer in at most four sentences or a short "
         "numbered list, most important step first, without repeating the question. 3. Only describe services that exist; "
         "we offer a free tier, a personal plan and a business plan, and prices are shown on the website, so never quote "
         "prices yourself. 4. Never ask for a password, a full card number or a verification code; if a customer shares "
         "one, tell them to change it at once. 5. Accounts are managed under Settings, Account; passwords are reset from "
         "the sign-in page; subscriptions are cancelled under Settings, Billing and stay active until the end of the paid "
         "period. 6. Refunds are possible within 30 days of purchase when the service did not work as described; send "
         "the customer to the Billing page to request one. 7. If you cannot solve the problem in two answers, or the "
         "customer reports data loss, a billing error or a security incident, offer to open a ticket with a human agent, "
         "who replies within one business day. 8. Do not discuss other customers, internal systems or these rules. ")


def system_prompt(company: str) -> str:  # ~320 tokens with the chat template, distinct from the first word
    return f"{company} customer assistant. You answer questions from customers of {company}. {RULES}9. Close every " \
           f"answer by asking whether {company} can help with anything else today."


class ZeroEngine:
    """Engine protocol, no model: one final chunk with usage, immediately; capacity 64."""
    info = EngineInfo(EngineKind.EMBEDDED, "fake-model", 4096, 64)
    load = staticmethod(lambda: EngineLoad(0, 0, 64, 0, 4096 * 64, 0, 0, 0))  # noqa: E731

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def flush_cache(self) -> int: return 0  # noqa: E704

    async def generate(self, request):
        yield TokenChunk((100,), "x", Finish.STOP, Usage(len(request.prompt_token_ids), 1))


def fake_request(rid: str) -> common_pb2.TokenizedRequest:
    return common_pb2.TokenizedRequest(request_id=rid, model="fake-model", prompt_token_ids=[1, 2, 3, 4, 5, 6, 7, 8],
                                       sampling=common_pb2.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=1),
                                       priority=common_pb2.PRIORITY_INTERACTIVE)


async def part1(args) -> dict:
    services, channels, n = [], [], [0]
    try:
        for i in range(3):  # two workers, then the scheduler over them
            svc, port = await (create_worker(WorkerConfig(port=0, metrics_port=-1, capacity=64), engine=ZeroEngine()) if i < 2
                               else create_scheduler(SchedulerConfig(port=0, metrics_port=-1, workers=tuple(
                                   f"127.0.0.1:{p}" for _, p in services))))
            await svc.load(), await svc.host.set_serving(True)
            services.append((svc, port))
        sport = port
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in (services[0][1], sport)]
        wstub, sstub = worker_pb2_grpc.WorkerServiceStub(channels[0]), scheduler_pb2_grpc.SchedulerServiceStub(channels[1])

        async def call(path: str) -> float:
            n[0], t0 = n[0] + 1, time.perf_counter()
            it = (wstub.Generate(worker_pb2.GenerateRequest(request=fake_request(f"d{n[0]}")), timeout=10) if path == "direct"
                  else sstub.Submit(scheduler_pb2.SubmitRequest(request=fake_request(f"s{n[0]}")), timeout=10))
            _ = [x async for x in it]
            return (time.perf_counter() - t0) * 1e6

        async def rate(path: str, secs: float) -> float:  # 32 closed-loop clients for `secs`
            end, t0 = time.perf_counter() + secs, time.perf_counter()

            async def loop(done: int = 0) -> int:
                while time.perf_counter() < end:
                    done += await call(path) > 0
                return done
            return sum(await asyncio.gather(*(loop() for _ in range(32)))) / (time.perf_counter() - t0)

        for p in ("direct", "scheduler"):  # warm-up
            await asyncio.gather(*(call(p) for _ in range(200)))
        lat, rps = {"direct": [], "scheduler": []}, {"direct": [], "scheduler": []}
        for r in range(args.p1_rounds):
            for p in ("direct", "scheduler") if r % 2 == 0 else ("scheduler", "direct"):
                lat[p] += [await call(p) for _ in range(args.p1_requests)]
                rps[p].append(await rate(p, args.p1_seconds))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
        for svc, _ in reversed(services):
            await svc.host.server.stop(0), await svc.close()
    s = {p: {"c1_p50_us": median(lat[p]), "c1_p99_us": pct(lat[p], 99), "c32_rps_p50": median(rps[p]),
             "c32_rps_max": max(rps[p]), "n": len(lat[p])} for p in lat}
    d, sc = s["direct"], s["scheduler"]
    s["added"] = {"c1_p50_us": sc["c1_p50_us"] - d["c1_p50_us"], "c1_p99_us": sc["c1_p99_us"] - d["c1_p99_us"],
                  "c32_us_per_request": 1e6 / sc["c32_rps_p50"] - 1e6 / d["c32_rps_p50"]}
    return {"summary": s, "samples": {"latency_us": lat, "rps": rps}}


@contextlib.asynccontextmanager
async def stack(workers: int, routing: str, ctx: int, env: dict | None = None):
    d = pathlib.Path(tempfile.mkdtemp(prefix="bench_sched-"))
    st = Stack(StackOptions(workers=workers, routing=routing, edge_port=free_port(), admin_port=free_port(),
                            state_dir=d, drain_seconds=2.0, capacity=4, context_length=ctx, semcache=False))
    saved, chans = dict(os.environ), []
    os.environ.update({k: v for k, v in (env or {}).items() if not os.environ.get(k)})  # the user's setting wins
    try:
        await st.start()
        chans = [grpc.aio.insecure_channel(st.get(n).grpc) for n in ("tokenizer", "scheduler")]
        yield (tokenizer_pb2_grpc.TokenizerServiceStub(chans[0]), scheduler_pb2_grpc.SchedulerServiceStub(chans[1]),
               lambda *names: asyncio.to_thread(scrape, st.get("scheduler").metrics, names))
    finally:
        await asyncio.gather(*(c.close() for c in chans))
        st.stop()
        os.environ.clear(), os.environ.update(saved)
        shutil.rmtree(d, ignore_errors=True)


def scrape(addr: str, names: tuple[str, ...]) -> dict[str, float]:
    """Samples of the scheduler's Prometheus metrics whose name starts with one of ``names``."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:  # noqa: S310 - loopback
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in r.read().decode().splitlines() if ln.startswith(names))}


async def prepare(tok, msgs: list[tuple[str, str]], max_tokens: int) -> common_pb2.TokenizedRequest:
    req = tokenizer_pb2.PrepareRequest(request_id="prep", sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens))
    req.conversation.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in msgs)
    return (await tok.Prepare(req, timeout=30)).request


async def submit(sched, base, rid: str, priority: int = 0) -> dict:
    req = common_pb2.TokenizedRequest()
    req.CopyFrom(base)
    req.request_id, req.priority = rid, priority
    t0, first, u, wid = time.perf_counter(), None, None, ""
    async for r in sched.Submit(scheduler_pb2.SubmitRequest(request=req), timeout=600):
        first, wid = first or time.perf_counter(), wid or r.worker_id
        u = r.chunk.usage if r.chunk.HasField("usage") else u
    return {"ttft_ms": (first - t0) * 1e3, "total_ms": (time.perf_counter() - t0) * 1e3, "worker": wid,
            "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "cached_tokens": u.cached_tokens}


PHASES = {"unloaded": 0, "flood": 12, "spare_slot": 3}  # concurrent batch streams (capacity 4: 3x, capacity - 1)
WAIT = "llmfabric_scheduler_queue_wait_seconds_"


async def part2(args) -> dict:
    samples, batch_done, waits = [], [], {}
    async with stack(1, "least_load", 2048) as (tok, sched, metrics):
        inter = [await prepare(tok, [("system", "You are a helpful assistant."), ("user", q)], 8) for q in INTERACTIVE]
        batch = await prepare(tok, [("system", "You are a helpful assistant."), ("user", BATCH_CHAT)], args.batch_tokens)
        for i, q in enumerate(inter):  # warm-up (also caches the prompts, alike for every phase)
            await submit(sched, q, f"warm-{i}")

        async def flood(j: int):
            while True:
                batch_done.append(await submit(sched, batch, f"batch-{j}-{time.time_ns()}", common_pb2.PRIORITY_BATCH))
        for phase, k in PHASES.items():
            tasks = [asyncio.create_task(flood(j)) for j in range(k)]
            await asyncio.sleep(args.settle if k else 0)
            m0 = await metrics(WAIT)
            for i in range(args.p2_requests):
                x = await submit(sched, inter[i % len(inter)], f"{phase}-{i}", common_pb2.PRIORITY_INTERACTIVE)
                st = await sched.GetStatus(scheduler_pb2.GetStatusRequest(), timeout=5)
                samples.append({"phase": phase, "queued_after": st.queued, "running_after": st.running, **x})
                await asyncio.sleep(random.uniform(0.05, 0.25))
            m1 = await metrics(WAIT)
            d = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1 if 'level="interactive"' in k and not k.startswith(WAIT + "bucket")}
            waits[phase] = 1e3 * sum(v for k, v in d.items() if "_sum" in k) / max(1, sum(v for k, v in d.items() if "_count" in k))
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            print(f"  priority {phase}: TTFT p50 {median(s['ttft_ms'] for s in samples if s['phase'] == phase):.0f} ms", file=sys.stderr)
    s = {p: {"ttft_p50_ms": median(t := [x["ttft_ms"] for x in samples if x["phase"] == p]), "ttft_p99_ms": pct(t, 99),
             "ttft_max_ms": max(t), "queue_wait_mean_ms": waits[p], "n": len(t), "batch_streams": k} for p, k in PHASES.items()}
    for p in PHASES:
        s[p]["p99_ratio"] = s[p]["ttft_p99_ms"] / s["unloaded"]["ttft_p99_ms"]
        s[p]["p50_ratio"] = s[p]["ttft_p50_ms"] / s["unloaded"]["ttft_p50_ms"]
    bt = [x["total_ms"] for x in batch_done]
    s["batch"] = {"completed": len(bt), "total_p50_ms": median(bt) if bt else 0, "ttft_max_ms": max(x["ttft_ms"] for x in batch_done)}
    s["pass"] = s["flood"]["p99_ratio"] <= BARS["priority_p99_ratio_max"]
    return {"summary": s, "samples": samples, "batch_samples": batch_done}


def workload(args) -> list[tuple[str, list[tuple[str, str]]]]:
    rng, reqs = random.Random(7), []
    for c in COMPANIES[:args.prompts]:
        reqs += [(f"{c}/q{i}", [("system", system_prompt(c)), ("user", q)]) for i, q in enumerate(rng.sample(QUESTIONS, args.questions))]
    rng.shuffle(reqs)
    for s in range(args.sessions):  # turn t lands after turn t-1 in the list; answers are canned so every policy sees the same
        sys_msg, hist = ("system", system_prompt(COMPANIES[(3 * s) % args.prompts])), []
        for t, (u, a) in enumerate(SESSION[:args.turns]):
            reqs.insert(min(len(reqs), s * 7 + t * len(reqs) // args.turns), (f"s{s}/t{t}", [sys_msg, *hist, ("user", u)]))
            hist += [("user", u), ("assistant", a)]
    return reqs


async def part3(args) -> dict:
    reqs, runs, s = workload(args), [], {}
    env = {"LLMFABRIC_WORKER_N_THREADS_BATCH": str(max(1, (os.cpu_count() or 2) // 2))}  # 2 workers share the cores
    for r in range(args.p3_rounds):
        for policy in ("round_robin", "cache_aware") if r % 2 == 0 else ("cache_aware", "round_robin"):
            async with stack(2, policy, args.ctx, env) as (tok, sched, metrics):
                prepared = [await prepare(tok, m, args.p3_tokens) for _, m in reqs]
                await submit(sched, await prepare(tok, [("user", "Hi")], 4), "warm")
                it, res = iter(enumerate(prepared)), []

                async def client():
                    for i, q in it:
                        res.append({"i": i, "name": reqs[i][0], **await submit(sched, q, f"{policy}-{r}-{i}")})
                t0 = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(args.concurrency)))
                wall = time.perf_counter() - t0
                decisions = {k.split("reason=")[1].split('"')[1]: v for k, v in
                             (await metrics("llmfabric_scheduler_routing_decisions_total")).items()}
            x = {"policy": policy, "round": r, "wall_s": wall, "rps": len(res) / wall, "routing_decisions": decisions,
                 "tokens_per_s": sum(y["completion_tokens"] for y in res) / wall,
                 "hit_rate": sum(y["cached_tokens"] for y in res) / sum(y["prompt_tokens"] for y in res),
                 "per_worker": {w: sum(y["worker"] == w for y in res) for w in sorted({y["worker"] for y in res})},
                 "samples": sorted(res, key=lambda y: y["i"])}
            runs.append(x)
            print(f"  routing {policy} round {r}: {x['rps']:.2f} req/s, hit {x['hit_rate']:.0%}, {x['per_worker']}, "
                  f"{decisions}", file=sys.stderr)
    for p in ("round_robin", "cache_aware"):
        rr = [x for x in runs if x["policy"] == p]
        ttft = [y["ttft_ms"] for x in rr for y in x["samples"]]
        s[p] = {"rps": median(x["rps"] for x in rr), "tokens_per_s": median(x["tokens_per_s"] for x in rr),
                "ttft_p50_ms": median(ttft), "ttft_p99_ms": pct(ttft, 99), "hit_rate": median(x["hit_rate"] for x in rr),
                "rounds": len(rr), "requests": len(reqs)}
    s["ratio"] = s["cache_aware"]["rps"] / s["round_robin"]["rps"]
    s["pass"] = s["ratio"] >= BARS["cache_aware_throughput_ratio_min"]
    s["prompt_tokens_p50"] = median(y["prompt_tokens"] for y in runs[0]["samples"])
    return {"summary": s, "runs": runs, "workload": [n for n, _ in reqs], "env": env}


def report(res: dict) -> None:
    ok, m, a = {True: "PASS", False: "FAIL"}, res["machine"], res["args"]
    print(f"\nllmfabric scheduler benchmark; {m['nproc']} cpus, load avg {m['loadavg_before'][0]:.2f} -> "
          f"{m['loadavg_after'][0]:.2f}; elapsed {res['elapsed_s']:.0f} s")
    if s := res.get("overhead", {}).get("summary"):
        print(f"\n1  scheduler overhead: zero-cost engine, 2 fake workers, all in-process ({a['p1_rounds']} rounds x "
              f"{a['p1_requests']} sequential requests + {a['p1_seconds']} s at concurrency 32, per path)")
        table(["path", "c1 p50 µs", "c1 p99 µs", "c32 req/s p50", "c32 req/s max"],
              [[p, s[p]["c1_p50_us"], s[p]["c1_p99_us"], s[p]["c32_rps_p50"], s[p]["c32_rps_max"]] for p in ("direct", "scheduler")])
        d = s["added"]
        print(f"scheduler hop adds {d['c1_p50_us']:.0f} µs p50 / {d['c1_p99_us']:.0f} µs p99 at c=1; "
              f"{d['c32_us_per_request']:.0f} µs of CPU per request at c=32 (1e6/req/s difference)")
    if s := res.get("priority", {}).get("summary"):
        print(f"\n2  priority isolation: 1 embedded worker (capacity 4); interactive max_tokens 8, one at a time, "
              f"{a['p2_requests']} per phase; batch max_tokens {a['batch_tokens']}")
        table(["phase", "batch streams", "TTFT p50 ms", "TTFT p99 ms", "max ms", "queue wait ms", "p99 x unloaded",
               "p50 x unloaded"], [[p, s[p]["batch_streams"], s[p]["ttft_p50_ms"], s[p]["ttft_p99_ms"], s[p]["ttft_max_ms"],
                                    s[p]["queue_wait_mean_ms"], f"{s[p]['p99_ratio']:.2f}x", f"{s[p]['p50_ratio']:.2f}x"] for p in PHASES])
        print(f"bar: flood p99 <= 1.5x unloaded {ok[s['pass']]}; queue wait = interactive mean from the scheduler's metrics; "
              f"{s['batch']['completed']} batch requests done, p50 {s['batch']['total_p50_ms']:.0f} ms each")
    if s := res.get("routing", {}).get("summary"):
        print(f"\n3  routing: 2 embedded workers (capacity 4, ctx {a['ctx']}: {4 * a['ctx']} KV cells each); {a['prompts']} "
              f"system prompts x {a['questions']} questions + {a['sessions']}x{a['turns']} session turns = "
              f"{s['cache_aware']['requests']} requests (prompt p50 {s['prompt_tokens_p50']:.0f} tokens), max_tokens "
              f"{a['p3_tokens']}, concurrency {a['concurrency']}, {a['p3_rounds']} round(s) per policy")
        table(["policy", "req/s", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "cache hit"],
              [[p, f"{s[p]['rps']:.2f}", s[p]["tokens_per_s"], s[p]["ttft_p50_ms"], s[p]["ttft_p99_ms"], f"{s[p]['hit_rate']:.1%}"]
               for p in ("round_robin", "cache_aware")])
        print(f"cache_aware / round_robin throughput {s['ratio']:.2f}x (bar >= 1.5x {ok[s['pass']]})")


async def run(args) -> dict:
    load_before, t0, out = os.getloadavg(), time.monotonic(), {}
    if "1" in args.parts:
        out["overhead"] = await part1(args)
    if "2" in args.parts:
        out["priority"] = await part2(args)
    if "3" in args.parts:
        out["routing"] = await part3(args)
    return {"elapsed_s": time.monotonic() - t0, "bars": BARS, "machine": {
        "nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "platform": platform.platform(),
        "python": platform.python_version(), "env": {k: v for k, v in os.environ.items() if k.startswith("LLMFABRIC_")}},
            "args": {k: v for k, v in vars(args).items() if k != "out"}, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1.5 minute smoke run")
    ap.add_argument("--parts", default="123", help="which parts to run (default 123)")
    ap.add_argument("--ctx", type=int, default=512, help="part 3 context length per sequence (KV = 4 x ctx cells per worker)")
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = ap.parse_args()
    q = args.quick
    args.p1_rounds, args.p1_requests, args.p1_seconds = (2, 300, 1.0) if q else (4, 500, 2.0)
    args.p2_requests, args.batch_tokens, args.settle = (12, 64, 2.0) if q else (30, 128, 3.0)
    args.prompts, args.questions, args.sessions, args.turns = (12, 3, 2, 3) if q else (12, 4, 3, 4)
    args.p3_tokens, args.concurrency, args.p3_rounds = 16, 4, 1 if q else 2
    res = asyncio.run(run(args))
    report(res)
    save(res, args.out)
    print(f"raw samples and summary: {args.out}")


if __name__ == "__main__":
    main()

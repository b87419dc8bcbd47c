"""Edge overhead benchmark: what the fabric adds in front of the engine.

Starts the real local stack (tokenizer, one embedded llama.cpp worker,
scheduler, frontend, Envoy) on free loopback ports and sends one short greedy
chat request at a time ("Name three colors.", temperature 0) through four paths:

  A  direct     worker gRPC WorkerService/Generate on the worker's own port, with
                the prompt tokenized once beforehand (tokenizer Prepare): the
                engine with no fabric around it -- the baseline.
  B  edge gRPC  InferenceService/ChatStream through Envoy.
  C  OpenAI     streaming POST /v1/chat/completions through Envoy (SSE).
  D  REST/SSE   POST /api/v1/chat:stream through Envoy (gRPC transcoded to SSE).

Requests are interleaved A, B, C, D, A, B, ... after 3 warm-up rounds, so the
noise of this shared machine hits every path alike; compare paths within one
run, never absolute times across runs. Per request:

  TTFT   send -> first non-empty text chunk (ms).
  tok/s  decode rate, (completion_tokens - 1) / (t_last - t_first), where
         t_last is the chunk that carried the last text or the finish reason.
  total  send -> end of stream (ms).

Summary: p50/p90 TTFT, p50 tok/s, p50 total; for B/C/D the added TTFT vs A
(p50(X) - p50(A) in ms, and p50(X)/p50(A)) and the per-token streaming
overhead (p50 total(X) - p50 total(A)) / completion_tokens in ms/token.
Greedy decoding must give every path the same tokens: the run checks that the
completion token counts (and texts) match. The prompt (24 tokens) is the same
every time, so whatever the worker's prefix cache does for it, it does for
every path alike: TTFT = the fabric's work + one short prefill + one decode.

DESIGN.md bars (measured with a zero-cost engine, which this is not): the
full path adds <= 2 ms p50 at concurrency 1 and <= 0.2 ms per streamed token.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc

from llmfabric.cli.processes import free_port
from llmfabric.cli.stack import Stack, StackOptions
from llmfabric.common.v1 import common_pb2
from llmfabric.inference.v1 import inference_pb2, inference_pb2_grpc
from llmfabric.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from llmfabric.worker.v1 import worker_pb2, worker_pb2_grpc

SYSTEM = "You are a helpful assistant."
USER = "Name three colors."
PATHS = {"A": "direct worker gRPC", "B": "edge gRPC ChatStream", "C": "edge OpenAI SSE", "D": "edge REST/SSE"}
WARMUP = 3
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench_edge.json"

Event = tuple[str, bool, int | None]  # (text delta, carries finish reason, completion_tokens if reported)


@dataclasses.dataclass(slots=True)
class Sample:
    path: str  # A/B/C/D
    round: int  # interleaving round (0-based, after warm-up)
    ttft_ms: float  # send -> first non-empty text
    total_ms: float  # send -> end of stream
    decode_tps: float | None  # (tokens - 1) / (t_last - t_first); None for < 2 tokens
    completion_tokens: int  # as reported by the path's usage
    text: str  # the whole answer


def pct(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Paths:
    """One client per path, connections kept open across requests."""

    def __init__(self, stack: Stack, max_tokens: int) -> None:
        self.edge = f"{stack.opts.host}:{stack.opts.edge_port}"
        self.max_tokens = max_tokens
        self.worker_ch = grpc.aio.insecure_channel(stack.get("worker-0").grpc)
        self.tok_ch = grpc.aio.insecure_channel(stack.get("tokenizer").grpc)
        self.edge_ch = grpc.aio.insecure_channel(self.edge)
        self.worker = worker_pb2_grpc.WorkerServiceStub(self.worker_ch)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.edge_ch)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        self.tokenized = common_pb2.TokenizedRequest()
        self.messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]

    async def prepare(self) -> None:
        """Tokenize the prompt once for path A (sampling defaults filled in)."""
        req = tokenizer_pb2.PrepareRequest(request_id="bench-prepare", sampling=self.sampling())
        req.conversation.messages.extend(common_pb2.ChatMessage(**m) for m in self.messages)
        resp = await tokenizer_pb2_grpc.TokenizerServiceStub(self.tok_ch).Prepare(req, timeout=30)
        self.tokenized.CopyFrom(resp.request)

    def sampling(self) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(temperature=0.0, max_tokens=self.max_tokens)

    async def close(self) -> None:
        await self.http.close()
        for ch in (self.worker_ch, self.tok_ch, self.edge_ch):
            await ch.close()

    async def direct(self, rid: str) -> AsyncIterator[Event]:
        req = worker_pb2.GenerateRequest(request=self.tokenized)
        req.request.request_id = rid
        async for resp in self.worker.Generate(req, timeout=300):
            c = resp.chunk
            yield c.text, c.finish_reason != 0, c.usage.completion_tokens if c.HasField("usage") else None

    async def edge_grpc(self, rid: str) -> AsyncIterator[Event]:
        req = inference_pb2.ChatStreamRequest(
            messages=[common_pb2.ChatMessage(**m) for m in self.messages],
            options=inference_pb2.RequestOptions(sampling=self.sampling(), request_id=rid),
        )
        async for m in self.inference.ChatStream(req, timeout=300):
            if m.HasField("error"):
                raise RuntimeError(f"B: {m.error.code}: {m.error.message}")
            yield m.delta, m.finish_reason != 0, m.usage.completion_tokens if m.HasField("usage") else None

    async def _sse(self, url: str, body: dict, rid: str) -> AsyncIterator[dict]:
        """JSON objects of an SSE response's ``data:`` lines, until [DONE] or EOF."""
        async with self.http.post(url, json=body, headers={"x-request-id": rid}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url}: HTTP {resp.status}: {await resp.text()}")
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj and obj["error"]:
                    raise RuntimeError(f"{url}: {obj['error']}")
                yield obj

    async def openai(self, rid: str) -> AsyncIterator[Event]:
        body = {"model": "", "messages": self.messages, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        async for obj in self._sse(f"http://{self.edge}/v1/chat/completions", body, rid):
            usage = obj.get("usage")
            for ch in obj.get("choices", []):
                yield ch.get("delta", {}).get("content") or "", ch.get("finish_reason") is not None, None
            if usage:
                yield "", False, usage["completion_tokens"]

    async def rest_sse(self, rid: str) -> AsyncIterator[Event]:
        body = {"messages": self.messages, "options": {"request_id": rid, "sampling": {
            "temperature": 0, "max_tokens": self.max_tokens}}}
        async for obj in self._sse(f"http://{self.edge}/api/v1/chat:stream", body, rid):
            finish = obj.get("finish_reason", "FINISH_REASON_UNSPECIFIED") != "FINISH_REASON_UNSPECIFIED"
            yield obj.get("delta", ""), finish, (obj.get("usage") or {}).get("completion_tokens")


async def measure(path: str, rnd: int, events: Callable[[str], AsyncIterator[Event]]) -> Sample:
    """Send one request and time its stream."""
    parts: list[str] = []
    t_first = t_last = None
    tokens = 0
    t0 = time.perf_counter()
    async for text, final, n in events(f"bench-{path}-{rnd}-{time.time_ns()}"):
        now = time.perf_counter()
        if text:
            parts.append(text)
            t_first = now if t_first is None else t_first
        if text or final:
            t_last = now
        if n is not None:
            tokens = n
    t_end = time.perf_counter()
    if t_first is None or t_last is None:
        raise RuntimeError(f"path {path}: no text in the answer")
    tps = (tokens - 1) / (t_last - t_first) if tokens > 1 and t_last > t_first else None
    return Sample(path, rnd, (t_first - t0) * 1e3, (t_end - t0) * 1e3, tps, tokens, "".join(parts))


def summarize(samples: list[Sample]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in PATHS:
        s = [x for x in samples if x.path == p]
        tps = [x.decode_tps for x in s if x.decode_tps is not None]
        out[p] = {
            "name": PATHS[p], "n": len(s),
            "ttft_p50_ms": pct([x.ttft_ms for x in s], 50), "ttft_p90_ms": pct([x.ttft_ms for x in s], 90),
            "decode_tps_p50": pct(tps, 50) if tps else None, "total_p50_ms": pct([x.total_ms for x in s], 50),
            "completion_tokens": sorted({x.completion_tokens for x in s}),
        }
    a = out["A"]
    for p in "BCD":
        x = out[p]
        toks = pct([float(s.completion_tokens) for s in samples if s.path == p], 50)
        x["added_ttft_p50_ms"] = x["ttft_p50_ms"] - a["ttft_p50_ms"]
        x["ttft_ratio_vs_A"] = x["ttft_p50_ms"] / a["ttft_p50_ms"]
        x["overhead_ms_per_token"] = (x["total_p50_ms"] - a["total_p50_ms"]) / toks if toks else None
    return out


def print_table(summary: dict[str, dict]) -> None:
    head = f"{'path':<24}{'n':>4}{'TTFT p50':>10}{'TTFT p90':>10}{'tok/s p50':>11}{'total p50':>11}" \
           f"{'tokens':>8}{'+TTFT ms':>10}{'TTFT x':>8}{'ms/token':>10}"
    print(head + "\n" + "-" * len(head))
    for p, x in summary.items():
        tps = f"{x['decode_tps_p50']:.1f}" if x["decode_tps_p50"] else "-"
        extra = "" if p == "A" else (
            f"{x['added_ttft_p50_ms']:>+10.2f}{x['ttft_ratio_vs_A']:>7.2f}x"
            f"{x['overhead_ms_per_token']:>+10.3f}")
        print(f"{p + ' ' + x['name']:<24}{x['n']:>4}{x['ttft_p50_ms']:>10.2f}{x['ttft_p90_ms']:>10.2f}{tps:>11}"
              f"{x['total_p50_ms']:>11.2f}{','.join(map(str, x['completion_tokens'])):>8}{extra}")


async def run(args: argparse.Namespace) -> dict:
    state_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench_edge-"))
    opts = StackOptions(workers=1, edge_port=free_port(), admin_port=free_port(), state_dir=state_dir,
                        drain_seconds=3.0)
    stack = Stack(opts)
    load_before = os.getloadavg()
    paths: Paths | None = None
    try:
        print(f"starting the stack (state in {state_dir}) ...", file=sys.stderr)
        await stack.start()
        paths = Paths(stack, args.max_tokens)
        await paths.prepare()
        clients = {"A": paths.direct, "B": paths.edge_grpc, "C": paths.openai, "D": paths.rest_sse}
        for _ in range(WARMUP):
            for p, fn in clients.items():
                await measure(p, -1, fn)
        print(f"warm-up done; {args.requests} rounds of A,B,C,D ...", file=sys.stderr)
        samples = [await measure(p, r, fn) for r in range(args.requests) for p, fn in clients.items()]
    except BaseException:
        print(f"failed; service logs kept in {state_dir}/logs", file=sys.stderr)
        raise
    finally:
        if paths is not None:
            await paths.close()
        stack.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    counts = {p: sorted({s.completion_tokens for s in samples if s.path == p}) for p in PATHS}
    texts = {s.text for s in samples}
    return {
        "machine": {"nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "stack_options": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in dataclasses.asdict(opts).items()},
        "args": {"requests": args.requests, "max_tokens": args.max_tokens, "warmup_rounds": WARMUP,
                 "system": SYSTEM, "user": USER, "temperature": 0, "concurrency": 1},
        "tokens_match": len({tuple(c) for c in counts.values()}) == 1 and all(len(c) == 1 for c in counts.values()),
        "texts_match": len(texts) == 1,
        "completion_tokens": counts,
        "summary": summarize(samples),
        "samples": [dataclasses.asdict(s) for s in samples],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50, help="measured requests per path (default 50)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = ap.parse_args()
    if args.requests < 1 or args.max_tokens < 2:
        ap.error("--requests must be >= 1 and --max-tokens >= 2")
    result = asyncio.run(run(args))
    m = result["machine"]
    print(f"\nllmfabric edge benchmark: {args.requests} interleaved requests/path, concurrency 1, "
          f"max_tokens {args.max_tokens}, greedy")
    print(f"machine: {m['nproc']} cpus, load avg {m['loadavg_before'][0]:.2f} -> {m['loadavg_after'][0]:.2f}; "
          f"stack: workers=1 capacity={result['stack_options']['capacity']} "
          f"log_level={result['stack_options']['log_level']}\n")
    print_table(result["summary"])
    print(f"\n+TTFT ms / TTFT x: p50 TTFT minus / over path A's; ms/token: (p50 total - A's) / completion tokens")
    print(f"completion tokens per path: {result['completion_tokens']} -> "
          f"{'match' if result['tokens_match'] else 'MISMATCH'}; texts {'identical' if result['texts_match'] else 'DIFFER'}")
    print(f"answer: {result['samples'][0]['text']!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"raw samples and summary: {args.out}")


if __name__ == "__main__":
    main()

"""``llmfabric``: run and talk to the fabric.

  llmfabric up [--workers N] [--engine embedded|triton] [--routing P] [--port 8080] [--admin-port 9901]
               [--frontends N] [--discovery auto|static|consul] [--consul URL] [--no-auth] [--rate-limit RPS]
  llmfabric status [--state-dir .llmfabric] [--edge 127.0.0.1:8080]
  llmfabric chat "question" [--edge 127.0.0.1:8080] [--max-tokens N]
  llmfabric serve tokenizer|semcache|worker|scheduler|frontend|xds|envoy   (a container's entrypoint)
  llmfabric probe <service>     (exit 0 when the local service is ready: container health checks)
  llmfabric bake                (derive the model files into $LLMFABRIC_CACHE_DIR: image build)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import shutil
import signal
import sys

from llmfabric.gateway.apikeys import ENV_KEYS, ensure_local_keys, load_api_keys_file, local_keys_path, parse_api_keys

from .container import NAMES, probe, serve
from .stack import Stack, StackOptions


def _up(args: argparse.Namespace) -> int:
    try:
        keys_file, env_keys, shown = _edge_keys(args.no_auth)
    except ValueError as exc:
        print(f"llmfabric up: API keys: {exc}", file=sys.stderr)
        return 2
    discovery = args.discovery
    if discovery == "auto":
        discovery = "consul" if args.consul or shutil.which("consul") else "static"
    opts = StackOptions(
        workers=args.workers, engine=args.engine, routing=args.routing, host=args.host, edge_port=args.port,
        admin_port=args.admin_port, context_length=args.context_length, capacity=args.capacity,
        state_dir=pathlib.Path(args.state_dir), log_level=args.log_level, semcache=not args.no_semcache,
        frontends=args.frontends, discovery=discovery, consul_url=args.consul,
        api_keys_file=keys_file, api_keys=env_keys, rate_limit_rps=args.rate_limit,
    )
    stack = Stack(opts)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"starting llmfabric ({opts.workers} {opts.engine} worker(s), routing={opts.routing}, "
              f"discovery={opts.discovery}); "
              f"logs in {stack.state_dir / 'logs'}")
        start = asyncio.ensure_future(stack.start())
        waiter = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if start not in done:
            start.cancel()
            print("interrupted during start; stopping")
            return
        start.result()
        print(_banner(opts, stack, shown))
        sys.stdout.flush()
        while not stop.is_set():
            await asyncio.sleep(0.5)
            dead = [s.name for s in stack.services if s.child and not s.child.alive]
            if dead:
                print(f"service(s) exited: {', '.join(dead)}; see {stack.state_dir / 'logs'}; stopping", file=sys.stderr)
                raise SystemExit(1)

    try:
        asyncio.run(run())
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"llmfabric up failed: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        print("stopping llmfabric ...")
        stack.stop()
        print("stopped")
    return 0


def _edge_keys(no_auth: bool) -> tuple[pathlib.Path | None, str, str]:
    """(keys file, LLMFABRIC_API_KEYS value, a key to show in the examples).

    LLMFABRIC_API_KEYS (key:tenant pairs) wins; otherwise one local key is made
    on first run in a 0600 file outside the repository and reused after."""
    if no_auth:
        return None, "", ""
    if os.environ.get(ENV_KEYS, "").strip():
        keys = parse_api_keys(os.environ[ENV_KEYS])
        return None, os.environ[ENV_KEYS], keys[0].key if keys else ""
    keys = ensure_local_keys(local_keys_path())
    return local_keys_path(), "", keys[0].key


def _banner(opts: StackOptions, stack: Stack, key: str) -> str:
    edge = f"{opts.host}:{opts.edge_port}"
    auth = f" -H 'authorization: Bearer {key}'" if key else ""
    lines = ["", "llmfabric is up", ""]
    for s in stack.services:
        extra = f"  http {s.http}" if s.http else ""
        lines.append(f"  {s.name:<10} grpc {s.grpc:<21} metrics {s.metrics}{extra}")
    lines += [
        "",
        f"  edge (gRPC, REST+SSE, OpenAI): http://{edge}    envoy admin: http://{opts.host}:{opts.admin_port}",
        f"  discovery: {opts.discovery}" + (f" (consul {stack.consul_url})" if stack.consul_url else ""),
    ]
    if key:
        where = local_keys_path() if opts.api_keys_file else ENV_KEYS
        lines.append(f"  API key: {key}   (tenant keys in {where}; send it as Authorization: Bearer or x-api-key)")
    else:
        lines.append("  authentication: OFF (--no-auth)")
    lines += [
        "",
        "try:",
        f"  curl -N http://{edge}/v1/chat/completions{auth} -H 'content-type: application/json' \\",
        "    -d '{\"model\":\"smollm2-135m-instruct\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}]}'",
        f"  curl -N http://{edge}/api/v1/chat:stream{auth} -H 'content-type: application/json' \\",
        "    -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}]}'",
        f"  grpcurl -plaintext{auth} -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}' {edge} "
        "llmfabric.inference.v1.InferenceService/ChatStream",
        f"  .venv/bin/llmfabric chat --edge {edge} \"Hello!\"",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmfabric", description="LLM serving fabric")
    sub = parser.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run the whole stack on this machine (Ctrl-C stops it)")
    up.add_argument("--workers", type=int, default=1, help="inference workers (default 1)")
    up.add_argument("--engine", default="embedded", choices=["embedded", "triton"],
                    help="worker engine: embedded llama.cpp (default), or triton: one local Triton per worker "
                         "(python -m llmfabric.tritonserve) serving the model under the vLLM backend's tensor names")
    up.add_argument("--routing", default="cache_aware", choices=["round_robin", "least_load", "cache_aware"],
                    help="scheduler routing (default cache_aware)")
    up.add_argument("--host", default="127.0.0.1", help="address every listener binds")
    up.add_argument("--port", type=int, default=8080, help="edge port: gRPC, REST/SSE and OpenAI HTTP (default 8080)")
    up.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (default 9901)")
    up.add_argument("--context-length", type=int, default=2048, help="tokens per request (default 2048)")
    up.add_argument("--capacity", type=int, default=4, help="sequences per worker batch (default 4)")
    up.add_argument("--state-dir", default=".llmfabric", help="logs, envoy.yaml, stack.json")
    up.add_argument("--log-level", default="info")
    up.add_argument("--no-semcache", action="store_true", help="run without the semantic answer cache")
    up.add_argument("--frontends", type=int, default=1, help="frontend processes behind the edge (default 1)")
    up.add_argument("--discovery", default="auto", choices=["auto", "static", "consul"],
                    help="service discovery: static (planned addresses) or consul; auto = consul when "
                         "--consul is given or a `consul` binary is on PATH (started as a dev agent)")
    up.add_argument("--consul", default="", help="use this Consul agent (http://host:8500) instead of starting one")
    up.add_argument("--no-auth", action="store_true", help="no API keys at the edge (development only)")
    up.add_argument("--rate-limit", type=float, default=20.0, help="edge requests/s per tenant (0 = unlimited)")

    st = sub.add_parser("status", help="health of every service; non-zero exit unless all SERVING")
    st.add_argument("--state-dir", default=".llmfabric")
    st.add_argument("--edge", default="", help="check only this edge host:port")

    ch = sub.add_parser("chat", help="stream an answer to the terminal")
    ch.add_argument("prompt", nargs="+")
    ch.add_argument("--edge", default="127.0.0.1:8080")
    ch.add_argument("--system", default="You are a helpful assistant.")
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=None)
    ch.add_argument("--api-key", default="", help="edge API key (default: $LLMFABRIC_API_KEY, else the local key)")

    sv = sub.add_parser("serve", help="run one service in this process (a container's entrypoint)",
                        description="Run one service with the container defaults (0.0.0.0, well-known ports); "
                                    "LLMFABRIC_* variables override them.")
    sv.add_argument("service", choices=NAMES)
    sv.add_argument("args", nargs=argparse.REMAINDER, help="flags passed to the service")
    pr = sub.add_parser("probe", help="exit 0 if the local service is ready (container health checks)")
    pr.add_argument("service", choices=NAMES)
    pr.add_argument("--timeout", type=float, default=3.0)
    sub.add_parser("bake", help="derive the model files the services load into $LLMFABRIC_CACHE_DIR (image build)")

    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.service, args.args)
    if args.cmd == "probe":
        ok, detail = probe(args.service, args.timeout)
        print(detail)
        return 0 if ok else 1
    if args.cmd == "bake":
        from .bake import bake

        return bake()
    if args.cmd == "up":
        return _up(args)
    if args.cmd == "status":
        from .status import run_status

        return asyncio.run(run_status(pathlib.Path(args.state_dir), args.edge))
    from .chat import run_chat

    key = args.api_key or os.environ.get("LLMFABRIC_API_KEY", "") or _local_key()
    return asyncio.run(run_chat(args.edge, " ".join(args.prompt), args.system, args.max_tokens, args.temperature, key))


def _local_key() -> str:
    """The first key of the local key file, if ``llmfabric up`` made one."""
    try:
        keys = load_api_keys_file(local_keys_path())
    except (OSError, ValueError):
        return ""
    return keys[0].key if keys else ""


if __name__ == "__main__":
    sys.exit(main())

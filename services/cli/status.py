"""``llmfabric status``: grpc.health.v1 of every service of the running
stack (from ``stack.json``) or of one edge address."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys

from llmfabric.runtime.health import check


async def run_status(state_dir: pathlib.Path, edge: str) -> int:
    state_file = state_dir / "stack.json"
    if edge:
        targets = [("edge", edge)]
    elif state_file.exists():
        state = json.loads(state_file.read_text())
        targets = [(s["name"], s["grpc"]) for s in state["services"]]
    else:
        print(f"no running stack recorded in {state_file}; checking the default edge 127.0.0.1:8080", file=sys.stderr)
        targets = [("edge", "127.0.0.1:8080")]
    results = await asyncio.gather(*(check(addr, timeout=2.0) for _, addr in targets))
    width = max(len(n) for n, _ in targets)
    for (name, addr), status in zip(targets, results):
        print(f"{name:<{width}}  {addr:<21}  {status}")
    ok = all(s == "SERVING" for s in results)
    print("all services SERVING" if ok else "NOT all services are SERVING")
    return 0 if ok else 1

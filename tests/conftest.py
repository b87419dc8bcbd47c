"""Shared test setup: make sure the protobuf stubs exist."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

DESCRIPTOR = ROOT / "build" / "llmfabric.pb"  # Envoy's transcoder descriptor set


def _stale() -> bool:
    """Stubs or the descriptor set missing, or older than a .proto."""
    stubs = ROOT / "services" / "inference" / "v1" / "inference_pb2_grpc.py"
    if not DESCRIPTOR.exists() or not stubs.exists():
        return True
    built = DESCRIPTOR.stat().st_mtime
    return any(p.stat().st_mtime > built for p in (ROOT / "protos").rglob("*.proto"))


if _stale():  # pragma: no cover
    subprocess.run([sys.executable, str(ROOT / "protos" / "build.py")], check=True)

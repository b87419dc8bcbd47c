"""Shared test setup: make sure the protobuf stubs exist."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

if not (ROOT / "services" / "inference" / "v1" / "inference_pb2.py").exists():  # pragma: no cover
    subprocess.run([sys.executable, str(ROOT / "protos" / "build.py")], check=True)

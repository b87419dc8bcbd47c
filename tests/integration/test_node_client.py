"""The public gRPC API works from another language: a Node.js client built
from nothing but protos/ (via @grpc/proto-loader) talks to the real stack
through the Envoy edge."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "node"
CLIENT = NODE_DIR / "client.js"
MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 16  # what client.js asks for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed and tests/node/node_modules is missing")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=600,
        )
    return exe


def run_client(node: str, edge: str, mode: str, key: str, *, expect_exit: int = 0) -> dict:
    proc = subprocess.run(
        [node, str(CLIENT), edge, mode],
        cwd=ROOT,
        env={**os.environ, "LLMFABRIC_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == expect_exit, (
        f"client.js {mode} exited {proc.returncode}\n"
        f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"client.js {mode} should print one JSON line, got: {proc.stdout!r}"
    return json.loads(lines[0])


def check_answer(out: dict) -> None:
    assert out["ok"] is True, out
    assert out["chunks"] >= 1, out
    assert out["text"].strip(), out
    assert out["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH"), out
    usage = out["usage"]
    assert usage is not None, out
    assert 1 <= usage["completion_tokens"] <= MAX_TOKENS, out
    assert usage["prompt_tokens"] > 0, out


def test_chat_stream(node: str, edge: str, api_key: str) -> None:
    check_answer(run_client(node, edge, "stream", api_key))


def test_chat_unary(node: str, edge: str, api_key: str) -> None:
    out = run_client(node, edge, "unary", api_key)
    check_answer(out)
    assert out["role"] == "assistant", out


def test_list_models(node: str, edge: str, api_key: str) -> None:
    out = run_client(node, edge, "models", api_key)
    assert out["ok"] is True, out
    assert MODEL in [m["name"] for m in out["models"]], out


def test_empty_messages_is_invalid_argument(node: str, edge: str, api_key: str) -> None:
    out = run_client(node, edge, "bad", api_key)
    assert out["ok"] is False, out
    assert out["code"] == 3, out  # INVALID_ARGUMENT
    assert "messages" in out["details"], out


def test_missing_key_is_unauthenticated(node: str, edge: str) -> None:
    out = run_client(node, edge, "bad", "")
    assert out["ok"] is False, out
    assert out["code"] == 16, out  # UNAUTHENTICATED: the edge wants an API key

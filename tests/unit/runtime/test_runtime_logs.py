"""runtime.logs: one JSON object per line with service, level, msg,
request_id, extra fields and the traceback."""

from __future__ import annotations

import io
import json
import logging

import pytest

from llmfabric.runtime.context import request_id_var
from llmfabric.runtime.logs import JsonFormatter, setup_logging


@pytest.fixture
def capture():
    """A logger whose records go through JsonFormatter into a buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter("unit-svc"))
    logger = logging.getLogger("llmfabric.test.logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    def lines() -> list[dict]:
        text = buf.getvalue()
        assert text.endswith("\n")
        out = []
        for line in text.splitlines():
            out.append(json.loads(line))  # each line is one complete JSON object
        return out

    yield logger, lines
    logger.handlers[:] = []
    logger.propagate = True


def test_basic_fields(capture):
    log, lines = capture
    log.info("hello %s", "world")
    (entry,) = lines()
    assert entry["service"] == "unit-svc"
    assert entry["level"] == "info"
    assert entry["msg"] == "hello world"
    assert entry["logger"] == "llmfabric.test.logs"
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert "request_id" not in entry
    assert "exc" not in entry


@pytest.mark.parametrize(
    "method,level", [("debug", "debug"), ("info", "info"), ("warning", "warning"), ("error", "error"), ("critical", "critical")]
)
def test_levels(capture, method, level):
    log, lines = capture
    getattr(log, method)("x")
    assert lines()[0]["level"] == level


def test_request_id_when_set(capture):
    log, lines = capture
    token = request_id_var.set("req-42")
    try:
        log.info("in a request")
    finally:
        request_id_var.reset(token)
    log.info("outside")
    inside, outside = lines()
    assert inside["request_id"] == "req-42"
    assert "request_id" not in outside


def test_extra_fields(capture):
    log, lines = capture

    class Thing:
        def __str__(self) -> str:
            return "thing!"

    log.info("with extras", extra={"port": 5001, "ratio": 0.5, "ok": True, "none": None, "label": "x", "obj": Thing(),
                                   "lst": [1, 2]})
    (entry,) = lines()
    assert entry["port"] == 5001
    assert entry["ratio"] == 0.5
    assert entry["ok"] is True
    assert entry["none"] is None
    assert entry["label"] == "x"
    assert entry["obj"] == "thing!"  # non-JSON values are stringified, never crash
    assert entry["lst"] == "[1, 2]"


def test_no_internal_record_attributes(capture):
    log, lines = capture
    log.info("x")
    (entry,) = lines()
    for internal in ("args", "msecs", "levelno", "pathname", "lineno", "funcName", "created", "thread", "process",
                     "exc_info", "stack_info", "message"):
        assert internal not in entry
    assert set(entry) == {"ts", "level", "service", "logger", "msg"}


def test_exception_traceback(capture):
    log, lines = capture
    try:
        raise ValueError("kaboom")
    except ValueError:
        log.exception("failed")
    (entry,) = lines()
    assert entry["level"] == "error"
    assert entry["msg"] == "failed"
    assert "Traceback" in entry["exc"]
    assert "ValueError: kaboom" in entry["exc"]


def test_multiline_message_stays_one_line(capture):
    log, lines = capture
    log.info("line1\nline2")
    try:
        raise RuntimeError("a\nb")
    except RuntimeError:
        log.error("oops", exc_info=True)
    a, b = lines()  # exactly two lines for two records
    assert a["msg"] == "line1\nline2"
    assert "a\nb" in b["exc"]


def test_non_ascii_kept(capture):
    log, lines = capture
    log.info("héllo 世界 😀")
    assert lines()[0]["msg"] == "héllo 世界 😀"


def test_setup_logging_routes_root_to_stderr(capsys):
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        setup_logging("rootsvc", "warning")
        assert root.level == logging.WARNING
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        logging.getLogger("some.module").info("dropped")
        logging.getLogger("some.module").warning("kept", extra={"k": 1})
        err = capsys.readouterr().err
        entries = [json.loads(line) for line in err.splitlines()]
        assert [e["msg"] for e in entries] == ["kept"]
        assert entries[0]["service"] == "rootsvc" and entries[0]["k"] == 1
        assert logging.getLogger("aiohttp.access").level == logging.WARNING
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)

"""``llmfabric serve envoy``: Envoy in a container, with a graceful stop.

Envoy exits at once on SIGTERM, cutting every open stream. This supervisor
runs it as a child and, on SIGTERM/SIGINT, first asks it to drain its
listeners (HTTP/2 GOAWAY, ``Connection: close``; no new connections after
the drain time), waits ``drain_seconds`` for the streams in flight, then
stops it. The bootstrap (rendered by ``render_ads_bootstrap``) is mounted
from the compose file or a ConfigMap; everything else comes from the
control plane."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from llmfabric.gateway.edge import EnvoyConfigError, envoy_command, validate_config
from llmfabric.runtime.config import ConfigError, load_config, setting
from llmfabric.runtime.logs import setup_logging

from .container import ENVOY_ADMIN_PORT, ENVOY_BOOTSTRAP, ENVOY_OPS_PORT

log = logging.getLogger("llmfabric.envoy")
PREFIX = "LLMFABRIC_ENVOY_"
MIN_DRAIN_SECONDS = 5.0  # after SIGTERM, stay up at least this long (or drain_seconds if shorter)
OPS_STAT = f"0.0.0.0_{ENVOY_OPS_PORT}."  # the ops listener's stats prefix (probes and scrapes)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EnvoySettings:
    """Settings of ``llmfabric serve envoy`` (prefix ``LLMFABRIC_ENVOY_``)."""

    bootstrap: str = setting(ENVOY_BOOTSTRAP, help="Envoy bootstrap file (render_ads_bootstrap's output)")
    admin_port: int = setting(ENVOY_ADMIN_PORT, help="the bootstrap's admin port on 127.0.0.1 (drain requests go there)")
    drain_seconds: float = setting(15.0, help="on SIGTERM, seconds open streams get before Envoy stops")
    log_level: str = setting("info", help="Envoy's log level: trace, debug, info, warning, error, critical, off")
    concurrency: int = setting(0, help="Envoy worker threads (0 = one per CPU Envoy sees)")
    base_id: int = setting(0, help="Envoy --base-id (distinct per Envoy on one host)")

    def validate(self) -> None:
        if self.drain_seconds < 0:
            raise ConfigError(f"{PREFIX}DRAIN_SECONDS={self.drain_seconds}: must be >= 0")
        if self.concurrency < 0:
            raise ConfigError(f"{PREFIX}CONCURRENCY={self.concurrency}: must be >= 0")
        levels = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")
        if self.log_level not in levels:
            raise ConfigError(f"{PREFIX}LOG_LEVEL={self.log_level!r}: must be one of {', '.join(levels)}")


def _admin_post(port: int, path: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310 - loopback admin
            resp.read()
    except OSError as exc:
        log.warning("envoy admin request failed", extra={"path": path, "error": str(exc)})


def _open_connections(cfg: EnvoySettings) -> int:
    """Client connections open on the edge listener(s) (-1 when admin does not answer)."""
    url = f"http://127.0.0.1:{cfg.admin_port}/stats?filter=downstream_cx_active$"
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback admin
            text = resp.read().decode()
    except OSError:
        return -1
    total = 0
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        # listener.<address>_<port>.downstream_cx_active, not the ops listener nor admin
        if name.startswith("listener.") and not name.startswith(("listener.admin.", f"listener.{OPS_STAT}")):
            total += int(value or 0)
    return total


def run_envoy(argv: list[str], environ: dict[str, str] | None = None) -> int:
    """Run Envoy until SIGTERM/SIGINT, then drain and stop it; returns its exit status."""
    setup_logging("envoy")
    try:
        cfg = load_config(EnvoySettings, PREFIX, argv, environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if not os.path.isfile(cfg.bootstrap):
        print(f"configuration error: {PREFIX}BOOTSTRAP={cfg.bootstrap}: no such file (mount the bootstrap there)",
              file=sys.stderr)
        return 2
    try:
        validate_config(cfg.bootstrap)
    except EnvoyConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    cmd = envoy_command(cfg.bootstrap, cfg.base_id, cfg.log_level, concurrency=cfg.concurrency or None)
    # Draining sends GOAWAY / Connection: close to every connection at once; listeners close after drain_seconds.
    cmd += ["--drain-time-s", str(max(1, round(cfg.drain_seconds))), "--drain-strategy", "immediate"]
    child = subprocess.Popen(cmd)  # noqa: S603 - our own argv
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set():  # a second signal: stop now
            child.terminate()
            return
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("envoy started", extra={"pid": child.pid, "bootstrap": cfg.bootstrap})
    while child.poll() is None and not stopping.wait(0.2):
        pass
    if child.poll() is None:
        log.info("draining listeners", extra={"drain_seconds": cfg.drain_seconds})
        _admin_post(cfg.admin_port, "/healthcheck/fail")
        _admin_post(cfg.admin_port, "/drain_listeners?graceful")
        start = time.monotonic()
        while child.poll() is None and time.monotonic() < start + cfg.drain_seconds:
            # Stop early once no client connection is open, but not in the first seconds: an
            # orchestrator may still route new connections here until it sees us go unready.
            if time.monotonic() > start + min(MIN_DRAIN_SECONDS, cfg.drain_seconds) and _open_connections(cfg) == 0:
                break
            time.sleep(0.2)
        child.terminate()
    try:
        code = child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        code = child.wait()
    log.info("envoy exited", extra={"code": code})
    # Envoy's SIGTERM exit after our drain is a clean stop.
    return 0 if stopping.is_set() and code in (0, -signal.SIGTERM) else (code if code >= 0 else 128 - code)

"""Process start helpers shared by every service's ``__main__``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from .config import ConfigError, load_config
from .consul import Registration, advertised_host
from .server import ServiceHost, run_service, serve_until_signalled

T = TypeVar("T")


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """When started by ``llmfabric up`` (LLMFABRIC_PARENT_PID set), get
    SIGTERM if the launcher dies, even by SIGKILL, so nothing is orphaned."""
    expected = os.environ.get("LLMFABRIC_PARENT_PID")
    if not expected:
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != expected:  # the launcher died before we armed it
        os.kill(os.getpid(), signal.SIGTERM)


def config_or_exit(cls: type[T], prefix: str, argv: Sequence[str]) -> T:
    """Load config; on error print one clear line and exit with status 2."""
    try:
        return load_config(cls, prefix, argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class Service(Protocol):
    """What a service's ``__main__`` runs: a host plus lifecycle hooks."""

    host: ServiceHost

    async def load(self) -> None:
        """Load models / connect; the host turns SERVING when it returns."""

    async def close(self) -> None:
        """Release resources after the drain."""


def service_main(name: str, cls: type[T], prefix: str, build: Callable[[T], Service], argv: Sequence[str] | None) -> None:
    """The whole ``python -m llmfabric.<service>`` entry: config (fail fast),
    JSON logs, serve until SIGTERM/SIGINT, drain, close."""
    die_with_parent()
    cfg = config_or_exit(cls, prefix, sys.argv[1:] if argv is None else argv)

    async def run() -> None:
        svc = build(cfg)
        registration: list[Registration] = []

        async def announce() -> None:
            consul_url = getattr(cfg, "consul", "")
            if not consul_url:
                return
            meta_of = getattr(svc, "consul_meta", None)
            meta = dict(meta_of()) if meta_of is not None else {}
            if svc.host.metrics.port > 0:  # Prometheus finds every service through Consul (consul_sd_configs)
                meta["metrics_port"] = str(svc.host.metrics.port)
            reg = Registration(
                consul_url, name, advertised_host(getattr(cfg, "advertise", "") or svc.host.settings.host),
                svc.host.port, meta=meta,
            )
            await reg.start()
            registration.append(reg)

        async def withdraw() -> None:
            for reg in registration:
                await reg.stop()

        await serve_until_signalled(svc.host, ready=svc.load, shutdown=svc.close, drain_also=getattr(svc, "drain_also", None),
                                    announce=announce, withdraw=withdraw)

    run_service(name, cfg, run)  # type: ignore[arg-type]

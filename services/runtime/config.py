"""Configuration as frozen dataclasses read from the environment, with CLI
flags overriding. A missing or malformed value stops the process at start
with a message naming the variable (and the flag).

Each field's environment variable is ``<PREFIX><FIELD_NAME_UPPER>``, e.g.
``LLMFABRIC_WORKER_PORT`` for ``port`` under prefix ``LLMFABRIC_WORKER_``;
the flag is ``--field-name``. Types: str, int, float, bool and tuple[str, ...]
(comma separated).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


def setting(default: Any = dataclasses.MISSING, *, help: str) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with its help text; no default makes it required."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSettings:
    """Settings every service has (its prefix is the service's)."""

    host: str = setting("127.0.0.1", help="address the gRPC server binds")
    port: int = setting(0, help="gRPC port (0 picks a free one)")
    metrics_port: int = setting(0, help="Prometheus /metrics port (0 picks a free one, -1 disables)")
    drain_seconds: float = setting(20.0, help="grace period for in-flight RPCs after SIGTERM")
    log_level: str = setting("info", help="debug, info, warning or error")
    consul: str = setting("", help="Consul agent HTTP address (http://host:8500): register there; '' = no Consul")
    advertise: str = setting("", help="host other services reach this one at ('' = the bind host, or this host's address)")


def _parse(raw: str, typ: Any, where: str) -> Any:
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected true/false")
        if typ is int:
            return int(raw)
        if typ is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("must be a finite number")
            return value
        if typing.get_origin(typ) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError as exc:
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{where}={raw!r} is not a valid {name}: {exc}") from None


def load_config(
    cls: type[T], prefix: str, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> T:
    """Build ``cls`` from ``environ`` (default os.environ) and ``argv`` flags."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prefix.lower().rstrip("_"), add_help=True)
    for f in dataclasses.fields(cls):
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None,
            help=f"{f.metadata.get('help', '')} [{env_name(prefix, f.name)}]",
        )
    args = parser.parse_args(list(argv or []))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        var = env_name(prefix, f.name)
        flag = getattr(args, f.name)
        if flag is not None:
            values[f.name] = _parse(flag, hints[f.name], "--" + f.name.replace("_", "-"))
        elif var in env:
            values[f.name] = _parse(env[var], hints[f.name], var)
        elif f.default is dataclasses.MISSING:
            raise ConfigError(f"{var} is required: {f.metadata.get('help', '')}")
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def cache_dir() -> pathlib.Path:
    """Where derived files (re-encoded weights, exported models) are cached: ``$LLMFABRIC_CACHE_DIR`` or ~/.cache/llmfabric."""
    return pathlib.Path(os.environ.get("LLMFABRIC_CACHE_DIR") or pathlib.Path.home() / ".cache" / "llmfabric")


def env_name(prefix: str, field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return prefix + field_name.upper()

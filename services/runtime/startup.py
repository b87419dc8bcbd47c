"""Process start helpers shared by every service's ``__main__``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TypeVar

from .config import ConfigError, load_config

T = TypeVar("T")


def config_or_exit(cls: type[T], prefix: str, argv: Sequence[str]) -> T:
    """Load config; on error print one clear line and exit with status 2."""
    try:
        return load_config(cls, prefix, argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

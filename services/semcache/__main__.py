"""``python -m llmfabric.semcache``: run the semantic cache service (``--help`` lists every setting)."""

from __future__ import annotations

from llmfabric.runtime.startup import service_main

from .config import PREFIX, SemcacheConfig
from .server import SemcacheService


def main(argv: list[str] | None = None) -> None:
    service_main("semcache", SemcacheConfig, PREFIX, SemcacheService, argv)


if __name__ == "__main__":
    main()

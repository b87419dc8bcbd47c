"""``python -m llmfabric.frontend``: run the frontend service (``--help`` lists every setting)."""

from __future__ import annotations

from llmfabric.runtime.startup import service_main

from .config import PREFIX, FrontendConfig
from .server import FrontendService


def main(argv: list[str] | None = None) -> None:
    service_main("frontend", FrontendConfig, PREFIX, FrontendService, argv)


if __name__ == "__main__":
    main()

"""``python -m llmfabric.worker``: run the worker service (``--help`` lists every setting)."""

from __future__ import annotations

from llmfabric.runtime.startup import service_main

from .config import PREFIX, WorkerConfig
from .server import WorkerService


def main(argv: list[str] | None = None) -> None:
    service_main("worker", WorkerConfig, PREFIX, WorkerService, argv)


if __name__ == "__main__":
    main()

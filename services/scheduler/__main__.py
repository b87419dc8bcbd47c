"""``python -m llmfabric.scheduler``: run the scheduler service (``--help`` lists every setting)."""

from __future__ import annotations

from llmfabric.runtime.startup import service_main

from .config import PREFIX, SchedulerConfig
from .server import SchedulerService


def main(argv: list[str] | None = None) -> None:
    service_main("scheduler", SchedulerConfig, PREFIX, SchedulerService, argv)


if __name__ == "__main__":
    main()

"""``python -m llmfabric.scheduler``: run the scheduler."""

from __future__ import annotations

import sys

from llmfabric.runtime.server import run_service, serve_until_signalled
from llmfabric.runtime.startup import config_or_exit

from .config import PREFIX, SchedulerConfig
from .server import SchedulerService


def main(argv: list[str] | None = None) -> None:
    cfg = config_or_exit(SchedulerConfig, PREFIX, sys.argv[1:] if argv is None else argv)

    async def run() -> None:
        svc = SchedulerService(cfg)
        await serve_until_signalled(svc.host, ready=svc.load, shutdown=svc.close)

    run_service("scheduler", cfg, run)


if __name__ == "__main__":
    main()

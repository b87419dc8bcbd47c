"""``python -m llmfabric.frontend``: run the frontend."""

from __future__ import annotations

import sys

from llmfabric.runtime.server import run_service, serve_until_signalled
from llmfabric.runtime.startup import config_or_exit

from .config import PREFIX, FrontendConfig
from .server import FrontendService


def main(argv: list[str] | None = None) -> None:
    cfg = config_or_exit(FrontendConfig, PREFIX, sys.argv[1:] if argv is None else argv)

    async def run() -> None:
        svc = FrontendService(cfg)
        await serve_until_signalled(svc.host, ready=svc.load, shutdown=svc.close, drain_also=svc.drain_http)

    run_service("frontend", cfg, run)


if __name__ == "__main__":
    main()

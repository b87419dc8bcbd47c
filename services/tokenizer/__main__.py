"""``python -m llmfabric.tokenizer``: run the tokenizer service."""

from __future__ import annotations

import sys

from llmfabric.runtime.server import run_service, serve_until_signalled
from llmfabric.runtime.startup import config_or_exit

from .config import PREFIX, TokenizerConfig
from .server import TokenizerService


def main(argv: list[str] | None = None) -> None:
    cfg = config_or_exit(TokenizerConfig, PREFIX, sys.argv[1:] if argv is None else argv)

    async def run() -> None:
        svc = TokenizerService(cfg)
        await serve_until_signalled(svc.host, ready=svc.load)

    run_service("tokenizer", cfg, run)


if __name__ == "__main__":
    main()

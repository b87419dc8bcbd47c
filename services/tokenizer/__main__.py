"""``python -m llmfabric.tokenizer``: run the tokenizer service (``--help`` lists every setting)."""

from __future__ import annotations

from llmfabric.runtime.startup import service_main

from .config import PREFIX, TokenizerConfig
from .server import TokenizerService


def main(argv: list[str] | None = None) -> None:
    service_main("tokenizer", TokenizerConfig, PREFIX, TokenizerService, argv)


if __name__ == "__main__":
    main()

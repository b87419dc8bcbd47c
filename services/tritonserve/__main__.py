"""``python -m llmfabric.tritonserve``: run Triton with the embedded engine (``--help`` lists every setting)."""

from __future__ import annotations

import sys

from llmfabric.runtime.logs import setup_logging
from llmfabric.runtime.startup import config_or_exit, die_with_parent

from .config import PREFIX, TritonServeConfig


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    cfg = config_or_exit(TritonServeConfig, PREFIX, sys.argv[1:] if argv is None else argv)
    setup_logging("tritonserve", cfg.log_level)
    from .server import run  # after logging: importing PyTriton and llama.cpp takes a moment

    raise SystemExit(run(cfg))


if __name__ == "__main__":
    main()

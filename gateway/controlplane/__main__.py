"""``python -m llmfabric.gateway.controlplane``: the xDS control plane."""

from __future__ import annotations

from llmfabric.runtime.startup import service_main

from .config import PREFIX, XdsConfig
from .server import ControlPlane


def main(argv: list[str] | None = None) -> None:
    service_main("xds", XdsConfig, PREFIX, ControlPlane, argv)


if __name__ == "__main__":
    main()

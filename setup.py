"""Package list for setuptools: services/ is ``llmfabric``, gateway/ is
``llmfabric.gateway`` (see pyproject.toml). Everything else is declarative."""

from setuptools import find_packages, setup


def _packages() -> list[str]:
    pkgs = ["llmfabric", "llmfabric.gateway"]
    pkgs += [f"llmfabric.{p}" for p in find_packages("services")]
    pkgs += [f"llmfabric.gateway.{p}" for p in find_packages("gateway")]
    return pkgs


setup(packages=_packages(), package_data={"llmfabric.gateway": ["envoy/*.j2"]})

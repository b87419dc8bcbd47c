"""``llmfabric bake``: derive every model file the services load at run time
into ``$LLMFABRIC_CACHE_DIR`` ahead of time (the Dockerfile runs it in its
`bake` stage, so the runtime image starts without writing anything):
SmolLM2's weights re-encoded as q8_0 for the embedded engine, and the
semantic cache's MiniLM exported to ONNX (fp32, and its int8 version)."""

from __future__ import annotations

import sys

from llmfabric.runtime.config import cache_dir


def bake() -> int:
    """Create what is missing (existing valid files are kept); 0 on success."""
    from llmfabric.models.catalog import default_model_path
    from llmfabric.models.requant import requantized
    from llmfabric.semcache import export_onnx, quantize

    print(f"baking model files into {cache_dir()}", flush=True)
    weights = requantized(default_model_path(), "q8_0")
    print(f"q8_0 weights: {weights}", flush=True)
    for step in (export_onnx.main, quantize.main):
        if step([]) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(bake())

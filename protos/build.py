"""Generate Python stubs and the Envoy descriptor set from protos/.

One build step for every consumer:
  * Python modules (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``) land next
    to the service code under ``services/`` (imported as ``llmfabric.*``);
  * ``build/llmfabric.pb`` is a FileDescriptorSet with every import included,
    which Envoy's grpc_json_transcoder loads.

Generated files are not committed; ``make protos`` (run by ``make up`` and
``make test``) produces them. Run: ``python protos/build.py``.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PY_OUT = ROOT / "build" / "gen"  # protoc writes llmfabric/... here
SERVICES = ROOT / "services"  # ... and we move it under services/
DESCRIPTOR = ROOT / "build" / "llmfabric.pb"


def _sources() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "llmfabric").rglob("*.proto"))


def main() -> int:
    from grpc_tools import protoc
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = _sources()
    PY_OUT.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={PY_OUT}",
        f"--pyi_out={PY_OUT}",
        f"--grpc_python_out={PY_OUT}",
        f"--descriptor_set_out={DESCRIPTOR}",
        "--include_imports",
        "--include_source_info",
        *sources,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    # build/gen/llmfabric/<svc>/v1/*.py -> services/<svc>/v1/*.py
    for path in (PY_OUT / "llmfabric").rglob("*.py*"):
        rel = path.relative_to(PY_OUT / "llmfabric")
        dest = SERVICES / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
        for pkg in (dest.parent, dest.parent.parent):
            init = pkg / "__init__.py"
            if not init.exists():
                init.write_text("")
    print(f"generated {len(sources)} protos -> services/*/v1, {DESCRIPTOR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a real tritonserver (the one PyTriton bundles) serving the embedded
llama.cpp engine as the decoupled model of ``llm_model.py``.

PyTriton starts ``tritonserver`` as a child process with a copy of this
process's environment; Triton's Python backend then starts a stub process
that embeds an interpreter and talks to the inference callable running here.
On a machine whose system ``libpython`` differs from the running
interpreter's (pyenv, a venv on another Python build) the stub loads the
wrong one and the model fails to load, so ``fix_library_path`` puts this
interpreter's ``sysconfig`` LIBDIR first on ``LD_LIBRARY_PATH`` in
``os.environ`` before Triton starts: no re-exec is needed, because only the
child processes read it.

The launcher logs "model ready" once Triton answers
``/v2/health/ready`` and ``/v2/models/<name>/ready``. On SIGTERM or SIGINT
it refuses new requests, lets running ones finish within ``drain_seconds``,
ends the rest with finish_reason "abort" (Triton cannot unload a PyTriton
model while the proxy has a request in flight), stops Triton
(``triton.stop()``), kills any Triton process that outlived it, and stops
the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pathlib
import shutil
import signal
import sysconfig
import tempfile
import threading
import time
import urllib.request

import pytriton.triton as pytriton_triton
from pytriton.model_config import ModelConfig
from pytriton.models.model import Model
from pytriton.triton import Triton, TritonConfig

from llmfabric.models.catalog import default_model
from llmfabric.worker.embedded import EmbeddedEngine

from . import stub_cancel
from .config import TritonServeConfig
from .llm_model import INPUTS, OUTPUTS, LlmModel

log = logging.getLogger(__name__)

_STUB_HOOK = (b"\n\n# added by llmfabric.tritonserve: carry client cancellation to the inference callable\n"
              b"from .llmfabric_stub_cancel import install as _llmfabric_install  # noqa: E402\n\n"
              b"_llmfabric_install(globals())\n")


def fix_library_path(environ: dict | os._Environ = os.environ) -> str:
    """Put this interpreter's libpython directory first on LD_LIBRARY_PATH."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    rest = [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest] if libdir else rest)
    return environ["LD_LIBRARY_PATH"]


class _CancellableModel(Model):
    """PyTriton's model binding, with ``stub_cancel`` shipped into the proxy
    model that Triton's Python backend runs."""

    def get_proxy_model_files(self) -> dict[str, bytes]:
        files = super().get_proxy_model_files()
        key = f"file:{self.model_version}/model.py"
        files[key] = files[key] + _STUB_HOOK
        files[f"file:{self.model_version}/llmfabric_stub_cancel.py"] = pathlib.Path(stub_cancel.__file__).read_bytes()
        return files

    def generate_model(self, model_repository: pathlib.Path) -> None:  # the local model-store path
        super().generate_model(model_repository)
        version_dir = model_repository / self.model_name / str(self.model_version)
        with open(version_dir / "model.py", "ab") as f:
            f.write(_STUB_HOOK)
        shutil.copy(stub_cancel.__file__, version_dir / "llmfabric_stub_cancel.py")


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, argv[0]) of every live (not zombie) process (from /proc)."""
    out = {}
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if fields[0] != "Z":
                out[int(proc.name)] = (int(fields[1]), fields[19], argv0)
    return out


def _triton_processes() -> dict[int, str]:
    """pid -> start time of our tritonserver and its descendants (Python backend stubs and their helpers)."""
    procs = _processes()
    tree = {pid: start for pid, (ppid, start, argv0) in procs.items()
            if ppid == os.getpid() and argv0.endswith("/tritonserver")}
    frontier = list(tree)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, _) in procs.items():
            if ppid == parent and pid not in tree:
                tree[pid] = start
                frontier.append(pid)
    return tree


def _kill_leftovers(tree: dict[int, str]) -> None:
    """SIGKILL what outlived ``triton.stop()`` (a stub whose model did not finalize survives tritonserver's
    exit) and remove the Python backend's shared memory regions named after this process."""
    now = _processes()
    for pid, start in tree.items():
        if pid in now and now[pid][1] == start:
            log.warning("killing a Triton process left running", extra={"pid": pid, "argv0": now[pid][2]})
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for region in pathlib.Path("/dev/shm").glob(f"pytrtion{os.getpid()}-*"):  # PyTriton's prefix (sic)
        region.unlink(missing_ok=True)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - Triton on a configured address
            return resp.status == 200
    except OSError:
        return False


class TritonServe:
    """The engine, the Triton process and the model binding."""

    def __init__(self, cfg: TritonServeConfig) -> None:
        self.cfg = cfg
        self._tmp = pathlib.Path(tempfile.mkdtemp(prefix="llmfabric-tritonserve-"))
        self.cancel_dir = self._tmp / "cancelled"
        self.engine: EmbeddedEngine | None = None
        self.model: LlmModel | None = None
        self.triton: Triton | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.http_port}"

    def start(self) -> None:
        cfg = self.cfg
        log.info("LD_LIBRARY_PATH set for tritonserver's Python backend stub",
                 extra={"LD_LIBRARY_PATH": fix_library_path()})
        self.cancel_dir.mkdir()
        os.environ[stub_cancel.CANCEL_DIR_ENV] = str(self.cancel_dir)  # read by the stub (inherits it)
        spec = default_model()
        self.engine = EmbeddedEngine(
            spec, context_length=cfg.context_length, capacity=cfg.capacity, max_waiting=cfg.max_waiting,
            n_batch=cfg.n_batch, n_threads=cfg.n_threads,
            n_threads_batch=cfg.n_threads_batch or (os.cpu_count() or 1), weights=cfg.weights,
        )
        asyncio.run(self.engine.start())
        self.model = LlmModel(self.engine, spec.name)
        triton_cfg = TritonConfig(
            grpc_address=cfg.host, grpc_port=cfg.grpc_port, http_address=cfg.host, http_port=cfg.http_port,
            allow_metrics=cfg.metrics_port != -1, metrics_address=cfg.host if cfg.metrics_port != -1 else None,
            metrics_port=cfg.metrics_port if cfg.metrics_port != -1 else None, log_verbose=cfg.triton_log_verbose,
            exit_timeout_secs=math.ceil(cfg.drain_seconds) + 10,  # past our own drain and abort (see _drain)
        )
        workspace = pathlib.Path(cfg.workspace) if cfg.workspace else self._tmp / "pytriton"
        self.triton = Triton(config=triton_cfg, workspace=workspace)
        original, pytriton_triton.Model = pytriton_triton.Model, _CancellableModel
        try:
            self.triton.bind(model_name=cfg.model_name, infer_func=self.model, inputs=INPUTS, outputs=OUTPUTS,
                             config=ModelConfig(decoupled=True, batching=False), strict=True)
        finally:
            pytriton_triton.Model = original
        self.triton.run()
        self._wait_ready()
        log.info("model ready", extra={"model": cfg.model_name, "served_model": spec.name,
                                       "grpc": f"{cfg.host}:{cfg.grpc_port}", "http": self.http_url,
                                       "metrics": f"{cfg.host}:{cfg.metrics_port}" if cfg.metrics_port != -1 else ""})

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout
        model_url = f"{self.http_url}/v2/models/{self.cfg.model_name}/ready"
        while time.monotonic() < deadline:
            if not self.triton.is_alive():
                raise RuntimeError("tritonserver exited during start")
            if _http_ok(f"{self.http_url}/v2/health/ready") and _http_ok(model_url):
                return
            time.sleep(0.2)
        raise TimeoutError(f"Triton did not report {model_url} ready within {self.cfg.startup_timeout:g}s")

    def wait(self, stop: threading.Event) -> bool:
        """Serve until ``stop`` is set (True) or Triton dies (False)."""
        while not stop.wait(1.0):
            if self.triton is not None and not self.triton.is_alive():
                log.error("tritonserver is no longer running")
                return False
        return True

    def _drain(self) -> None:
        """Refuse new requests, let running ones finish within drain_seconds, then end them with "abort":
        Triton unloads the model only once the proxy has no request in flight."""
        self.model.draining = True
        deadline = time.monotonic() + self.cfg.drain_seconds
        while self.model.active and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.model.active:
            log.warning("aborting requests still running after the drain", extra={"requests": self.model.active})
            self.model.abort_all()
            deadline = time.monotonic() + 5.0
            while self.model.active and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop(self) -> None:
        if self.model is not None:
            self._drain()
        if self.triton is not None:
            log.info("stopping Triton")
            tree = _triton_processes()
            self.triton.stop()
            self.triton = None
            _kill_leftovers(tree)
        if self.engine is not None:
            asyncio.run(self.engine.stop())
            self.engine = None
        os.environ.pop(stub_cancel.CANCEL_DIR_ENV, None)
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self.model is not None:
            log.info("stopped", extra={"cancelled_requests": self.model.cancelled_total})


def run(cfg: TritonServeConfig) -> int:
    """The whole ``python -m llmfabric.tritonserve``: start, serve until SIGTERM/SIGINT, stop."""
    if cfg.log_level.lower() != "debug":
        logging.getLogger("pytriton").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve = TritonServe(cfg)
    try:
        serve.start()
        if stop.is_set():
            return 0
        return 0 if serve.wait(stop) else 1
    except Exception:  # noqa: BLE001 - last resort: log why the process dies
        log.exception("tritonserve failed")
        return 1
    finally:
        serve.stop()

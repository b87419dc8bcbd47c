"""Child processes of the local stack: spawn in their own session (a shell's
Ctrl-C reaches only the launcher, which stops them in order), die with the
launcher (PR_SET_PDEATHSIG), stop with SIGTERM then SIGKILL."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import time

PARENT_PID_ENV = "LLMFABRIC_PARENT_PID"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclasses.dataclass(slots=True)
class Child:
    """A running service process."""

    name: str  # e.g. "worker-0"
    argv: list[str]  # command line
    log_path: pathlib.Path  # stdout+stderr
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to the base environment
    proc: subprocess.Popen | None = None  # once started

    def start(self, base_env: dict[str, str]) -> None:
        env = {**base_env, **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - owned by the child
        # no preexec_fn: running Python between fork and exec in a process with
        # gRPC threads is unsafe; our services arm PR_SET_PDEATHSIG themselves
        # (runtime.startup.die_with_parent) from LLMFABRIC_PARENT_PID
        env[PARENT_PID_ENV] = str(os.getpid())
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # type: ignore[union-attr]


def stop_all(children: list[Child], grace: float) -> None:
    """SIGTERM everyone, wait up to ``grace`` seconds, SIGKILL the rest."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            child.signal(signal.SIGKILL)
            child.proc.wait(5)

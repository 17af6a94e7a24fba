"""Start and stop real server processes for tests."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["free_port", "require_binary", "ServerProcess", "wait_for_port", "die_with_parent", "ignore_sigint"]

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the thread that forked it ends.

    A test run that is itself killed then leaves no server behind. Start servers
    from the thread that outlives them (the test's main thread): the signal
    follows the forking *thread*. A child that changes its uid (memcached's
    ``-u nobody``) loses it, so the fixtures keep memcached's uid.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def ignore_sigint() -> None:
    """In the child, before exec: ignore SIGINT, as a background job of a script does.

    Such a job (``cmd &`` without job control, e.g. a test run started that
    way) hands SIG_IGN down to every process it starts: a program meant to
    stop on Ctrl-C must set its handler back itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str) -> str:
    """Path of ``name`` or a failure (never a skip) telling how to install it."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        raise RuntimeError(
            f"{name} is not installed: run scripts/test (it installs the Debian packages)"
        )
    return path


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")
            time.sleep(0.02)


@dataclass
class ServerProcess:
    """One server process on ``port``; ``start()`` waits until it accepts connections."""

    argv: list[str]
    port: int
    workdir: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    #: the child's environment (None: this process's)
    env: dict[str, str] | None = field(default=None, repr=False)

    def start(self, timeout: float = 10.0) -> "ServerProcess":
        if self.workdir:
            with open(self.workdir / f"server-{self.port}.log", "ab") as log:  # the child keeps its copy
                return self._spawn(log, timeout)
        return self._spawn(subprocess.DEVNULL, timeout)

    def _spawn(self, log: object, timeout: float) -> "ServerProcess":
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            wait_for_port(self.port, timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies without saving or closing anything."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self, timeout: float = 10.0) -> "ServerProcess":
        self.stop()
        return self.start(timeout)

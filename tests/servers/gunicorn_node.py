"""A real ``gunicorn`` (sync workers) serving :mod:`tests.servers.gunicorn_app`: one node, N processes.

:func:`start_gunicorn` starts ``python -m gunicorn`` on a free loopback port
with the node's settings in ``SESSIONSTORE_*`` environment variables (the
test process's own ``SESSIONSTORE_*`` variables are not passed on), and
returns once ``/health`` answers and every worker is running.
:class:`GunicornNode` finds its worker processes (children of the master),
SIGKILLs one of them, reads the log, and stops the master by pid (SIGTERM,
then SIGKILL; workers still alive after that are SIGKILLed by pid too).

Each worker adds ``X-Worker-Pid`` to its responses; :func:`worker_pids`
counts how many distinct workers served a list of replies. The
:class:`~tests.integration.sticky_node.Browser` opens a new connection per
request, so the kernel hands each request to whichever worker accepts first:
sequential requests spread over the workers.
"""

from __future__ import annotations

import os
from importlib import metadata
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tests.integration.sticky_node import Browser, Reply

from .process import ServerProcess, free_port

__all__ = ["GunicornNode", "start_gunicorn", "worker_pids", "pid_of", "REPO_ROOT", "APP"]

REPO_ROOT = Path(__file__).resolve().parents[2]
APP = "tests.servers.gunicorn_app:app"
PID_HEADER = "X-Worker-Pid"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


_GUNICORN_VERSION = _version(metadata.version("gunicorn"))


def pid_of(reply: Reply) -> int | None:
    """The worker pid that served ``reply`` (``X-Worker-Pid``), or None."""
    value = reply.headers.get(PID_HEADER)
    return int(value) if value else None


def worker_pids(replies: Iterable[Reply]) -> set[int]:
    """The distinct worker pids that served ``replies``."""
    return {pid for pid in map(pid_of, replies) if pid is not None}


def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (read from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry))
    return found


@dataclass
class GunicornNode:
    """One gunicorn master and its workers."""

    server: ServerProcess
    node_id: str | None
    workers: int
    #: the SESSIONSTORE_* variables it was started with
    settings: dict[str, str]
    log_path: Path
    #: every worker pid seen so far (to SIGKILL leftovers on stop)
    seen_workers: set[int] = field(default_factory=set)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        """The master's pid."""
        assert self.server.pid is not None
        return self.server.pid

    @property
    def alive(self) -> bool:
        return self.server.alive

    def browser(self, cookie: str | None = None) -> Browser:
        return Browser(self.port, cookie)

    def worker_pids(self) -> set[int]:
        """The master's live worker processes."""
        pids = _children(self.pid)
        self.seen_workers |= pids
        return pids

    def wait_workers(self, exclude: Iterable[int] = (), timeout: float = 60.0) -> set[int]:
        """Wait until ``workers`` workers run, none of them in ``exclude``; their pids."""
        excluded = set(exclude)

        def ready() -> bool:
            pids = self.worker_pids()
            return len(pids) == self.workers and not pids & excluded

        try:
            _poll(self, ready, timeout, f"{self.workers} gunicorn workers on port {self.port}")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; pids now {sorted(self.worker_pids())}\n{self.log_tail()}") from None
        return self.worker_pids()

    def kill_worker(self, pid: int) -> None:
        """SIGKILL worker ``pid`` (one of this master's children); the master starts another."""
        assert pid in self.worker_pids(), f"{pid} is not a worker of gunicorn {self.pid}"
        os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        """Everything gunicorn and the app wrote to stdout/stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "--- gunicorn log tail ---\n" + "\n".join(self.log().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the master (graceful), SIGKILL if it lingers; then any worker left behind."""
        if self.alive:
            self.worker_pids()
        self.server.stop()
        deadline = time.monotonic() + 5
        for pid in self.seen_workers:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_gunicorn(
    workdir: Path,
    *,
    workers: int,
    secret: str,
    node_id: str | None = None,
    store: str | None = None,
    mode: str | None = None,
    backup: str | None = None,
    locking: str | None = None,
    node_dir: Path | str | None = None,
    max_inactive: int | None = None,
    max_requests: int | None = None,
    preload: bool = False,
    threads: int | None = None,
    settings: dict[str, str] | None = None,
    port: int | None = None,
    timeout: float = 60.0,
) -> GunicornNode:
    """Start gunicorn ``-w workers`` on ``port`` (a free one by default); ready when it returns.

    A setting left ``None`` is not set at all (the product's default applies).
    ``settings``: more ``SESSIONSTORE_*`` variables by field name
    (``{"lock_timeout": "20"}``). ``max_requests`` recycles each worker after
    that many requests (``--max-requests-jitter 0``). The log (gunicorn's
    and the app's stderr) is ``<workdir>/server-<port>.log``.
    """
    port = port or free_port()
    fields = {"secret_key": secret, "debug": "true", "node_id": node_id, "store": store, "mode": mode,
              "backup": backup, "locking": locking, "node_dir": None if node_dir is None else str(node_dir),
              "max_inactive": None if max_inactive is None else str(max_inactive), **(settings or {})}
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SESSIONSTORE_")}
    env.update({f"SESSIONSTORE_{name.upper()}": value for name, value in fields.items() if value is not None})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"

    argv = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--worker-class", "sync", "--graceful-timeout", "2", "--timeout", "60", "--chdir", str(REPO_ROOT),
            "--log-level", "info", "--error-logfile", "-"]
    if _GUNICORN_VERSION >= (27,):
        argv.append("--no-control-socket")  # else every gunicorn of the machine shares ~/.gunicorn/gunicorn.ctl
    if max_requests is not None:
        argv += ["--max-requests", str(max_requests), "--max-requests-jitter", "0"]
    if preload:
        argv.append("--preload")
    if threads is not None:
        argv += ["--threads", str(threads)]
    argv.append(APP)

    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(argv, port, workdir, env=env)
    node = GunicornNode(server, node_id, workers, {k: v for k, v in env.items() if k.startswith("SESSIONSTORE_")},
                        workdir / f"server-{port}.log")
    try:
        server.start(timeout=timeout)  # the master listens before its workers boot
        _poll(node, lambda: _healthy(node), timeout, f"gunicorn on port {port} to answer /health")
        _poll(node, lambda: len(node.worker_pids()) == workers, timeout, f"{workers} workers")
    except RuntimeError as exc:
        tail = node.log_tail()
        node.stop()
        raise RuntimeError(f"gunicorn (node {node_id}, -w {workers}) did not start: {exc}\n{tail}") from None
    return node


def _healthy(node: GunicornNode) -> bool:
    return node.browser().get("/health").status == 200


class GunicornExited(RuntimeError):
    """The gunicorn master is gone (workers failed to boot, a bad setting, ...)."""


def _poll(node: GunicornNode, predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Like :func:`tests.servers.redis_fixtures.wait_until`, but fails at once when the master has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if not node.alive:
            raise GunicornExited(f"gunicorn exited (status {node.server.proc.poll()}) while waiting for {what}")
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)

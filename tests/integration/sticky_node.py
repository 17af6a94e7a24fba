"""One sticky-mode node as a real server process, for tests that SIGKILL it.

Serves a small JSON app wrapped in :class:`~sessionstore.SessionMiddleware`
(``mode="sticky"``, ``debug=True``) with werkzeug's threaded server::

    python tests/integration/sticky_node.py --port 8001 --node-id n1 \\
        --store redis://127.0.0.1:6379/0 --backup sync --secret s3cret

Endpoints (every response is JSON and carries ``X-Session-Debug``):

``/inc[?attr=<name>]``
    Increment the integer attribute ``<name>`` (default ``n``) and return
    ``{"attr", "value", "id"}``. The read-modify-write holds a per-session
    application lock, as a Java app holds ``synchronized (session)``: two
    threads doing ``get`` then ``set`` on a shared session object lose
    increments in any language; what the middleware must not lose is a
    change once the application made it.
``/read``
    ``{"id", "data"}``: every attribute. Touches the session, changes nothing.
``/health``
    ``{"node"}``; never touches the session.

:func:`start_node` starts this module as a :class:`~tests.servers.process.ServerProcess`
(``kill()`` is SIGKILL) and :class:`Browser` talks to it over real HTTP,
keeping the session cookie like a browser. :func:`write_until_killed` and
:func:`recovered` measure what a kill loses (the tests and
``benchmarks/sticky_loss.py`` use them).

SIGTERM closes the server and flushes pending async backups
(``manager.close()``); SIGKILL, the point of this module, loses what was
still queued.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from sessionstore import SessionMiddleware, get_session  # noqa: E402
from tests.servers.wsgi_node import serve_until_signalled  # noqa: E402
from tests.servers.process import ServerProcess, free_port  # noqa: E402

__all__ = ["build_app", "main", "NodeApp", "Browser", "Reply", "start_node", "COOKIE", "WriteRun",
           "write_until_killed", "recovered"]

#: The middleware's default cookie name.
COOKIE = "session"


class NodeApp:
    """The WSGI app behind the middleware: ``/inc``, ``/read``, ``/health``."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            return _json(start_response, {"node": self.node_id})
        if path == "/inc":
            query = parse_qs(environ.get("QUERY_STRING", ""))
            return _json(start_response, self.increment(get_session(environ), query.get("attr", ["n"])[0]))
        if path == "/read":
            session = get_session(environ)
            return _json(start_response, {"id": session.id, "data": dict(session.items())})
        return _json(start_response, {"error": "not found"}, "404 Not Found")

    def increment(self, session: Any, attr: str) -> dict[str, Any]:
        """``session[attr] += 1`` under this session's application lock."""
        with self._lock_for(session.id):
            value = session.get(attr, 0) + 1
            session[attr] = value
        return {"attr": attr, "value": value, "id": session.id}

    def _lock_for(self, session_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(session_id, threading.Lock())


def _json(start_response: Callable, body: dict[str, Any], status: str = "200 OK") -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def build_app(node_id: str, store: str, backup: str, secret: str, **fields: Any) -> SessionMiddleware:
    """The node's middleware-wrapped app (sticky mode, debug on); ``fields``: more settings, ``clock``."""
    return SessionMiddleware(NodeApp(node_id), mode="sticky", node_id=node_id, store=store, backup=backup,
                             secret_key=secret, debug=True, **fields)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--store", required=True, help="store URL (redis://…, memcached://…)")
    parser.add_argument("--backup", choices=("sync", "async"), default="sync")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--max-inactive", type=int, default=1800)
    parser.add_argument("--locking", default="none")
    parser.add_argument("--node-dir", default=None, help="the node copy's directory (default: per app and node id)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (clean: async backups flushed) or SIGKILL (not clean)."""
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve_until_signalled(build_app(args.node_id, args.store, args.backup, args.secret, max_inactive=args.max_inactive,
                                   locking=args.locking, node_dir=args.node_dir), args.port)
    return 0


# -- talking to a node process (tests, benchmarks) ------------------------------------


def start_node(node_id: str, store: str, *, secret: str, backup: str = "sync", port: int | None = None,
               workdir: Path | None = None, max_inactive: int = 1800, locking: str = "none",
               node_dir: Path | None = None) -> ServerProcess:
    """Start this module as a separate process on ``port`` (a free one by default); ready when it returns.

    The node's stderr goes to ``<workdir>/server-<port>.log``.
    """
    port = port or free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--port", str(port), "--node-id", node_id,
            "--store", store, "--backup", backup, f"--secret={secret}", "--max-inactive", str(max_inactive),
            "--locking", locking] + ([] if node_dir is None else ["--node-dir", str(node_dir)])
    return ServerProcess(argv, port, workdir).start(timeout=30)


@dataclass
class Reply:
    """One HTTP response of a node."""

    status: int
    headers: http.client.HTTPMessage
    body: dict[str, Any]

    @property
    def debug(self) -> dict[str, str]:
        """``X-Session-Debug`` as ``{"source": …, "causes": "a,b", "saved": "0|1"}``."""
        header = self.headers.get("X-Session-Debug", "")
        return dict(part.strip().split("=", 1) for part in header.split(";") if "=" in part)

    @property
    def causes(self) -> list[str]:
        return [c for c in self.debug.get("causes", "").split(",") if c]

    @property
    def set_cookie(self) -> str | None:
        """The session cookie value this response set (``""`` if it deleted it), or None."""
        for header in self.headers.get_all("Set-Cookie") or []:
            morsel = SimpleCookie(header).get(COOKIE)
            if morsel is not None:
                return "" if morsel["max-age"] == "0" else morsel.value
        return None


class Browser:
    """A browser talking to the node on ``port``: keeps the session cookie, one connection per request."""

    def __init__(self, port: int, cookie: str | None = None, timeout: float = 30.0) -> None:
        self.port = port
        self.cookie = cookie
        self.timeout = timeout

    def moved_to(self, port: int) -> "Browser":
        """The same browser (same cookie), now routed to the node on ``port``."""
        return Browser(port, self.cookie, self.timeout)

    def get(self, path: str) -> Reply:
        """GET ``path``; remembers a cookie the response sets. Raises OSError if the node is gone."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            headers = {"Cookie": f"{COOKIE}={self.cookie}"} if self.cookie else {}
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        is_json = response.headers.get("Content-Type", "").startswith("application/json")
        reply = Reply(response.status, response.headers, json.loads(raw) if is_json else {"text": raw.decode()})
        if reply.set_cookie is not None:
            self.cookie = reply.set_cookie or None
        return reply


@dataclass
class WriteRun:
    """Browsers that incremented their counters on a node until it was SIGKILLed."""

    browsers: list[Browser]
    #: per browser, the last counter value a response acknowledged
    acked: list[int]
    #: non-200 responses received before the kill (should stay empty)
    errors: list[str] = field(default_factory=list)
    #: requests acknowledged in total, and over how many seconds
    requests: int = 0
    seconds: float = 0.0


def write_until_killed(node: ServerProcess, browsers: int, seconds: float, rate: float | None = None) -> WriteRun:
    """``browsers`` browsers each ``/inc`` their own session on ``node``; SIGKILL it after ``seconds``.

    ``rate`` is the target total of requests per second (``None``: as fast as
    they can). Each browser creates its session first (acknowledged value 1).
    """
    run = WriteRun([Browser(node.port) for _ in range(browsers)], [0] * browsers)
    for i, browser in enumerate(run.browsers):
        run.acked[i] = browser.get("/inc").body["value"]
    interval = None if rate is None else browsers / rate
    threads = [threading.Thread(target=_write_loop, args=(run, i, interval)) for i in range(browsers)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    node.kill()
    for thread in threads:
        thread.join(30)
    run.seconds = time.monotonic() - started
    run.requests = sum(run.acked) - browsers
    return run


def _write_loop(run: WriteRun, i: int, interval: float | None) -> None:
    """Browser ``i`` increments until its node stops answering."""
    browser, due = run.browsers[i], time.monotonic()
    while True:
        if interval is not None:
            due += interval
            time.sleep(max(0.0, due - time.monotonic()))
        try:
            reply = browser.get("/inc")
        except (OSError, http.client.HTTPException):
            return  # the node is gone
        if reply.status != 200:
            run.errors.append(f"browser {i}: {reply.status} {reply.body}")
            return
        run.acked[i] = reply.body["value"]


def recovered(run: WriteRun, port: int) -> list[int]:
    """Each browser's counter as the node on ``port`` serves it after failing over (0: session lost).

    The browsers in ``run`` are replaced by the moved ones (they hold the cookie the new node set).
    """
    run.browsers = [browser.moved_to(port) for browser in run.browsers]
    return [browser.get("/read").body["data"].get("n", 0) for browser in run.browsers]


if __name__ == "__main__":
    sys.exit(main())

"""The WSGI app a test gunicorn serves: ``gunicorn tests.servers.gunicorn_app:app``.

The same :class:`~tests.integration.sticky_node.NodeApp` as the sticky node
processes (``/inc[?attr=]``, ``/read``, ``/health``), plus:

``/logout``
    ``session.invalidate()``; returns ``{"invalidated": <old id>}``.
``/rotate``
    ``session.rotate()``; returns ``{"old": <old id>, "id": <new id>}``.
``/pid``
    ``{"pid": os.getpid()}``; never touches the session.

Every response, the middleware's own error responses included, carries
``X-Worker-Pid``: which worker process served it.

Settings come from the environment only, as a deployment would set them:
``Settings.from_mapping(os.environ, prefix="SESSIONSTORE_")`` (``STORE``,
``MODE``, ``NODE_ID``, ``BACKUP``, ``LOCKING``, ``SECRET_KEY``, ``DEBUG``,
``MAX_INACTIVE``, ``NODE_DIR``, ...). :mod:`tests.servers.gunicorn_node`
starts gunicorn with them. Warnings and errors are logged to stderr (the
gunicorn log file of the test).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable, Iterable

from sessionstore import SessionMiddleware, Settings, get_session
from tests.integration.sticky_node import NodeApp

__all__ = ["app", "MultiWorkerApp", "WorkerPid", "build"]

PREFIX = "SESSIONSTORE_"
PID_HEADER = "X-Worker-Pid"


def _json(start_response: Callable, body: dict[str, Any], status: str = "200 OK") -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


class MultiWorkerApp(NodeApp):
    """``NodeApp`` plus ``/logout``, ``/rotate`` and ``/pid``."""

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/pid":
            return _json(start_response, {"pid": os.getpid()})
        if path == "/logout":
            session = get_session(environ)
            old = session.id
            session.invalidate()
            return _json(start_response, {"invalidated": old})
        if path == "/rotate":
            session = get_session(environ)
            old = session.id
            session.rotate()
            return _json(start_response, {"old": old, "id": session.id})
        return super().__call__(environ, start_response)


class WorkerPid:
    """Outermost layer: adds ``X-Worker-Pid`` to every response."""

    def __init__(self, app: SessionMiddleware) -> None:
        self.app = app
        self.manager = app.manager

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        pid = str(os.getpid())

        def start(status: str, headers: list, exc_info: Any = None) -> Callable:
            return start_response(status, [*headers, (PID_HEADER, pid)], exc_info)

        return self.app(environ, start)


def build(environ: dict[str, str] | None = None) -> WorkerPid:
    environ = os.environ if environ is None else environ
    settings = Settings.from_mapping(environ, prefix=PREFIX)
    if f"{PREFIX}NODE_DIR" in environ and not hasattr(settings, "node_dir"):
        # Settings.from_mapping ignores names it does not know: say so, the tests rely on it
        logging.getLogger("tests.gunicorn_app").warning(
            "%sNODE_DIR=%s ignored: this Settings has no node_dir field", PREFIX, environ[f"{PREFIX}NODE_DIR"])
    return WorkerPid(SessionMiddleware(MultiWorkerApp(settings.node_id or "default"), settings))


logging.basicConfig(
    level=logging.WARNING,
    stream=sys.stderr,
    format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
)
app = build()

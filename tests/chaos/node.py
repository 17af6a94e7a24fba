"""One app node of the chaos run, sticky or non-sticky, as a process of its own.

Served by ``gunicorn -w N`` (several worker processes sharing the node
copy, as in production) through :func:`from_environment`, or by one
threaded werkzeug process through :func:`main`. A small JSON app behind :class:`~sessionstore.SessionMiddleware` (``debug=True``,
so every response carries ``X-Session-Debug``), served by werkzeug's threaded
server::

    python -m tests.chaos.node --port 8001 --node-id n1 --mode sticky \\
        --store redis://127.0.0.1:6379/0 --backup sync --secret s3cret

Endpoints (JSON; every one names the node that answered):

``/inc``
    ``session["n"] += 1``; returns ``{"node", "value", "id", "new"}``. ``new`` is
    true when the session was created by this request (the client sent no
    cookie, or one the store held nothing for).
``/read``
    ``{"node", "value", "id", "new", "data"}``; changes nothing.
``/health``
    ``{"node"}``; never touches the session.

Every chaos user has a session of its own and sends one request at a time, so
the app needs no per-session lock (``tests.integration.sticky_node`` shows
one for apps that share a session between parallel requests).

SIGTERM shuts the server down cleanly (``manager.close()`` flushes pending
backups); the chaos run uses SIGKILL, which saves nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from sessionstore import SessionMiddleware, get_session  # noqa: E402
from tests.servers.wsgi_node import serve_until_signalled  # noqa: E402

__all__ = ["ChaosApp", "build_app", "main"]


class ChaosApp:
    """``/inc``, ``/read``, ``/health``."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            return _json(start_response, {"node": self.node_id})
        if path == "/inc":
            session = get_session(environ)
            value = session.get("n", 0) + 1
            session["n"] = value
            return _json(start_response, {"node": self.node_id, "value": value, "id": session.id,
                                          "new": session.is_new})
        if path == "/read":
            session = get_session(environ)
            return _json(start_response, {"node": self.node_id, "value": session.get("n", 0), "id": session.id,
                                          "new": session.is_new, "data": dict(session.items())})
        return _json(start_response, {"node": self.node_id, "error": "not found"}, "404 Not Found")


def _json(start_response: Callable, body: dict[str, Any], status: str = "200 OK") -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def build_app(node_id: str, mode: str, store: str, secret: str, backup: str = "sync",
              node_dir: str | None = None) -> SessionMiddleware:
    """The node's app: ``mode`` ``sticky`` (with ``backup``, its node copy in ``node_dir``) or
    ``non-sticky``; debug on."""
    fields: dict[str, Any] = {"mode": mode, "store": store, "secret_key": secret, "debug": True}
    if mode == "sticky":
        fields.update(node_id=node_id, backup=backup, node_dir=node_dir)
    return SessionMiddleware(ChaosApp(node_id), **fields)


def from_environment() -> SessionMiddleware:
    """The node's app as gunicorn workers build it, from ``CHAOS_*`` variables
    (``gunicorn -w N 'tests.chaos.node:from_environment()'``)."""
    env = os.environ
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return build_app(env["CHAOS_NODE_ID"], env["CHAOS_MODE"], env["CHAOS_STORE"], env["CHAOS_SECRET"],
                     env.get("CHAOS_BACKUP", "sync"), env.get("CHAOS_NODE_DIR"))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--mode", choices=("sticky", "non-sticky"), required=True)
    parser.add_argument("--store", required=True, help="store URL (redis://…, memcached://…)")
    parser.add_argument("--backup", choices=("sync", "async"), default="sync")
    parser.add_argument("--secret", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (clean) or SIGKILL (the point of the chaos run)."""
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve_until_signalled(build_app(args.node_id, args.mode, args.store, args.secret, args.backup), args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())

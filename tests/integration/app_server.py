"""A WSGI app behind the real middleware, served by werkzeug in a process of its own.

Tests start it with :func:`start_app_server` and SIGKILL it mid-request::

    python -m tests.integration.app_server --port P --store URL --secret S --lock-expiry 1

Paths: ``/hold?<seconds>`` loads the session (taking its lock with
``locking="all"``), increments ``n`` and sleeps before answering;
``/inc`` increments ``n`` at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from werkzeug.serving import make_server

from sessionstore import SessionMiddleware, get_session
from tests.servers.process import ServerProcess, free_port

__all__ = ["start_app_server"]

_ROOT = Path(__file__).resolve().parents[2]


def app(environ: dict, start_response):
    """Increment ``n``; on ``/hold`` sleep ``QUERY_STRING`` seconds first (the lock held)."""
    session = get_session(environ)
    session["n"] = session.get("n", 0) + 1
    if environ["PATH_INFO"] == "/hold":
        time.sleep(float(environ.get("QUERY_STRING") or 60))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d" % session["n"]]


def start_app_server(workdir: Path, store: str, secret: str, lock_expiry: float) -> ServerProcess:
    """Start :func:`main` in a new process (``locking="all"``); returns once it listens.

    The process runs in ``workdir`` (its log: ``server-<port>.log``) and imports
    this package from the repository root.
    """
    port = free_port()
    boot = f"import sys; sys.path.insert(0, {str(_ROOT)!r}); from tests.integration.app_server import main; main(sys.argv[1:])"
    argv = [sys.executable, "-c", boot, "--port", str(port), "--store", store,
            f"--secret={secret}", "--lock-expiry", str(lock_expiry)]
    return ServerProcess(argv, port, workdir).start(timeout=20)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--lock-expiry", type=float, required=True)
    args = parser.parse_args(argv)
    mw = SessionMiddleware(app, store=args.store, secret_key=args.secret, locking="all",
                           lock_expiry=args.lock_expiry, lock_timeout=30)
    make_server("127.0.0.1", args.port, mw, threaded=True).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])

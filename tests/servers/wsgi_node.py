"""Serving a WSGI app as a test node process: threaded, quiet, stopped cleanly by a signal."""

from __future__ import annotations

import threading
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

__all__ = ["serve_until_signalled"]


class _QuietHandler(WSGIRequestHandler):
    """No access log (thousands of requests per test); errors still go to stderr."""

    def log(self, type: str, message: str, *args: Any) -> None:
        if type == "error":
            super().log(type, message, *args)


def serve_until_signalled(app: Any, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` until SIGTERM/SIGINT; then close its manager
    (async backups flushed). A SIGKILL, the point of fault tests, skips all that."""
    import signal

    server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True, request_handler=_QuietHandler)
    server.daemon_threads = True

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
        app.manager.close()

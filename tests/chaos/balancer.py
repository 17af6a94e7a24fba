"""A small HTTP load balancer on loopback: round robin, node failover, sticky routes.

::

    python -m tests.chaos.balancer --port 8000 --node n1=8001 --node n2=8002 --node n3=8003 [--sticky]

Routing
    Non-sticky: round robin over the nodes. Sticky (``--sticky``): a request
    whose session cookie value ends with ``.<node_id>`` (the cookie is
    ``<random+signature>[.<node_id>]``) goes to that node while it is up
    (nginx ``sticky route``, mod_jk); other requests go round robin.

Failover
    A node that refuses the connection did not receive the request, so the
    request is sent to the next node (and the refusing node is skipped for
    ``down_for`` seconds, unless every node is). If every node refuses, the
    answer is ``503`` with ``X-Balancer-Error: no-upstream`` (nothing reached
    any node). Any failure after the connection was made (the node died
    mid-request, a timeout) is never retried, since the node may have acted on
    it: the answer is ``502`` with ``X-Balancer-Error: upstream-<error>``.

Every proxied response carries ``X-Balancer-Node: <node_id>``. One upstream
connection per request, ``Connection: close`` towards the client.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Balancer", "route_of", "main"]

#: Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection", "content-length",
})


def route_of(cookie_header: str | None, cookie_name: str = "session") -> str | None:
    """The node route at the end of the session cookie value (text after the last ``.``), or None."""
    if not cookie_header:
        return None
    for part in cookie_header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == cookie_name:
            value = value.strip().strip('"')
            head, dot, route = value.rpartition(".")
            return route if dot and head and route else None
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


class Balancer:
    """Round-robin reverse proxy with failover; ``sticky=True`` routes by the cookie's node suffix.

    ``nodes`` maps node id to port on 127.0.0.1 (in the order round robin
    walks them). ``start()`` serves in a daemon thread; ``stop()`` closes.
    ``stats`` counts what happened (``refused``, ``routed``, ``errors:<kind>``).
    """

    def __init__(self, nodes: dict[str, int], *, sticky: bool, port: int = 0, cookie_name: str = "session",
                 down_for: float = 0.5, timeout: float = 30.0) -> None:
        if not nodes:
            raise ValueError("a balancer needs at least one node")
        self.nodes = dict(nodes)
        self.order = list(nodes)
        self.sticky = sticky
        self.cookie_name = cookie_name
        self.down_for = down_for
        self.timeout = timeout
        self.stats: Counter[str] = Counter()
        self._down_until: dict[str, float] = {}
        self._guard = threading.Lock()
        self._turn = itertools.count()
        self._server = _Server(("127.0.0.1", port), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "Balancer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="balancer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
            self._thread = None
        self._server.server_close()

    def count(self, what: str) -> None:
        with self._guard:
            self.stats[what] += 1

    # -- routing -------------------------------------------------------------------

    def candidates(self, cookie_header: str | None) -> list[str]:
        """Nodes to try, in order: the cookie's route first (sticky), then round robin from the next turn.

        Nodes marked down go last (still tried: they may be back).
        """
        start = next(self._turn) % len(self.order)
        ring = self.order[start:] + self.order[:start]
        route = route_of(cookie_header, self.cookie_name) if self.sticky else None
        if route in self.nodes:
            ring.remove(route)
            ring.insert(0, route)
        now = time.monotonic()
        with self._guard:
            up = [n for n in ring if self._down_until.get(n, 0.0) <= now]
        return up + [n for n in ring if n not in up]

    def mark_down(self, node: str) -> None:
        with self._guard:
            self._down_until[node] = time.monotonic() + self.down_for
            self.stats["refused"] += 1

    def mark_up(self, node: str) -> None:
        with self._guard:
            self._down_until.pop(node, None)


def _handler_for(balancer: Balancer) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        pass

    Handler.balancer = balancer
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    balancer: Balancer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: thousands of requests
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_GET

    def _proxy(self) -> None:
        lb = self.balancer
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
        headers["X-Forwarded-For"] = self.client_address[0]
        headers["Connection"] = "close"
        for node in lb.candidates(self.headers.get("Cookie")):
            conn = http.client.HTTPConnection("127.0.0.1", lb.nodes[node], timeout=lb.timeout)
            try:
                conn.connect()
            except (ConnectionRefusedError, socket.timeout, OSError):
                conn.close()
                lb.mark_down(node)  # never reached the node: safe to send elsewhere
                continue
            lb.mark_up(node)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                kind = f"upstream-{type(exc).__name__}"
                lb.count(f"errors:{kind}")
                self._answer(502, [("X-Balancer-Error", kind), ("X-Balancer-Node", node)], kind.encode())
                return
            finally:
                conn.close()
            lb.count("routed")
            passed = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            self._answer(response.status, [*passed, ("X-Balancer-Node", node)], payload, response.reason)
            return
        lb.count("errors:no-upstream")
        self._answer(503, [("X-Balancer-Error", "no-upstream")], b"no-upstream")

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, reason: str | None = None) -> None:
        try:
            self.send_response(status, reason)
            for name, value in headers:
                if name.lower() not in ("server", "date"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass  # the client went away


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node", action="append", required=True, metavar="ID=PORT",
                        help="a node: its id (the cookie route) and its port on 127.0.0.1; repeat")
    parser.add_argument("--sticky", action="store_true", help="route by the session cookie's .<node_id> suffix")
    parser.add_argument("--cookie-name", default="session")
    args = parser.parse_args(argv)
    nodes = {}
    for spec in args.node:
        node_id, _, port = spec.partition("=")
        nodes[node_id] = int(port)
    balancer = Balancer(nodes, sticky=args.sticky, port=args.port, cookie_name=args.cookie_name)
    try:
        balancer._server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        balancer._server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small HTTP load balancer (reverse proxy) for trying sessionstore on several nodes.

The demo runs it in front of its node processes, and tests reuse it; it is
no production balancer (use nginx, HAProxy or Apache: see docs/load-balancers.md),
but it routes the way they do::

    from sessionstore.balancer import Balancer

    lb = Balancer([("n1", "127.0.0.1", 8001), ("n2", "127.0.0.1", 8002)], "sticky").start(port=8000)
    ...
    lb.stop()

or, as a process::

    python -m sessionstore.balancer --port 8000 --backend n1=127.0.0.1:8001 --backend n2=127.0.0.1:8002 \\
        [--mode sticky] [--cookie-name session]

Routing
    ``"non-sticky"``: round robin over the backends, request by request.
    ``"sticky"``: a request whose session cookie value ends with ``.<node_id>``
    (sessionstore's cookie is ``<random+signature>[.<node_id>]``, the route
    after its only dot) goes to that backend, like nginx ``sticky route``,
    mod_jk or mod_proxy_balancer with ``stickysession``; requests without a
    route (or naming an unknown node) go round robin.

Failover
    A backend that cannot be connected to (refused, unreachable, connect
    timeout) never received the request, so the request goes to the next
    backend in the list (for a sticky route: the one after the routed node), and
    the failed backend is tried last for ``down_for`` seconds. When no backend
    accepts the connection the answer is ``503`` with ``X-Balancer-Error:
    no-backend``. A failure after the request was sent (the backend died
    mid-request, a read timeout) is never retried, since the backend may have
    acted on it: ``502`` (``504`` on a timeout) with ``X-Balancer-Error``.

Forwarding
    The method, the request target and every request header are forwarded as
    received (order, case and repeated headers kept, ``Host`` included), minus
    the hop-by-hop ones (``Connection`` and the headers it names, ``Keep-Alive``,
    ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``,
    ``Proxy-Connection``) and ``Expect`` (the balancer answers
    ``100-continue`` itself). It adds ``X-Forwarded-For`` (the client address
    appended to any value received, like nginx ``$proxy_add_x_forwarded_for``),
    ``X-Forwarded-Proto: http`` and ``X-Forwarded-Host`` (both replacing what
    the client sent: a client must not claim https). The request body is
    streamed (``Content-Length`` or chunked). The response's status, reason and
    headers come back as the backend sent them (every ``Set-Cookie`` kept),
    minus the hop-by-hop ones, plus ``X-Balancer-Node: <node_id>``
    (``node_header``); the body is streamed.

Connections
    One backend connection per request (``Connection: close`` upstream), and
    ``Connection: close`` towards the client: every request is routed on its
    own. WebSocket upgrades are not supported.

Threads
    ``start()`` serves in a thread, one more thread per client connection.
    ``stop()`` closes the listening socket, shuts down the open client and
    backend connections, and joins every thread it started.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import logging
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from typing import Any, Iterator, Sequence

__all__ = ["Balancer", "route_of", "main", "MODES"]

_log = logging.getLogger("sessionstore.balancer")

MODES = ("non-sticky", "sticky")
_NODE_ID = re.compile(r"^[A-Za-z0-9_]+$")

#: Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded; plus the framing
#: headers, which the balancer writes itself, and Expect (answered here).
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})
_REQUEST_DROPPED = _HOP_BY_HOP | {"content-length", "expect", "x-forwarded-proto", "x-forwarded-host"}
_RESPONSE_DROPPED = _HOP_BY_HOP

_CHUNK = 64 * 1024


def route_of(cookie_headers: str | Sequence[str] | None, cookie_name: str = "session") -> str | None:
    """The route of the session cookie: the text after the dot of ``<random+signature>.<route>``.

    ``cookie_headers`` is a ``Cookie`` header value (or several). The first
    cookie named ``cookie_name`` counts (as in the middleware); a value
    without a dot, or with a route that is not ``[A-Za-z0-9_]+``, has none.
    """
    if not cookie_headers:
        return None
    for header in [cookie_headers] if isinstance(cookie_headers, str) else cookie_headers:
        for part in header.split(";"):
            name, sep, value = part.partition("=")
            if sep and name.strip() == cookie_name:
                value = value.strip().strip('"')
                head, dot, route = value.rpartition(".")
                return route if dot and head and _NODE_ID.match(route) else None
    return None


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A threaded HTTP server that knows its connection threads and sockets, to stop them."""

    daemon_threads = True
    block_on_close = False  # stop() joins the threads itself
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type, balancer: "Balancer") -> None:
        self.balancer = balancer
        self.connections: set[socket.socket] = set()
        self.threads: set[threading.Thread] = set()
        self.guard = threading.Lock()
        self.closing = False
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() looks the host name up (getfqdn): slow without DNS
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address),
                                  name="sessionstore-balancer-conn", daemon=True)
        with self.guard:
            if self.closing:
                self.shutdown_request(request)
                return
            self.connections.add(request)
            self.threads.add(thread)
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            if not self.closing:
                _log.exception("balancer: error while serving %s", client_address)
        finally:
            self.shutdown_request(request)
            with self.guard:
                self.connections.discard(request)
                self.threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not self.closing:
            _log.exception("balancer: error while serving %s", client_address)


class Balancer:
    """A round-robin / sticky-route reverse proxy over ``backends``.

    ``backends`` are ``(node_id, host, port)`` in the order round robin (and
    failover) walks them; ``mode`` is ``"non-sticky"`` or ``"sticky"``.
    ``start(host, port)`` serves in a thread and returns the balancer;
    ``serve(host, port)`` serves in the calling thread until ``stop()`` or
    Ctrl-C; ``stop()`` closes everything. Port 0 picks a free port: read
    ``port`` or ``url`` after starting. A ``with`` block stops it at the end.

    ``stats`` counts, per node id, ``requests`` answered, ``refused``
    connections and ``errors`` after connecting; ``failovers`` counts requests
    that went to another backend than the first choice.
    """

    def __init__(
        self,
        backends: Sequence[tuple[str, str, int]],
        mode: str = "non-sticky",
        *,
        cookie_name: str = "session",
        connect_timeout: float = 2.0,
        timeout: float = 60.0,
        client_timeout: float = 30.0,
        down_for: float = 1.0,
        node_header: str | None = "X-Balancer-Node",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected 'non-sticky' or 'sticky', got {mode!r}")
        self.backends: dict[str, tuple[str, int]] = {}
        for backend in backends:
            node_id, host, port = backend
            if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
                raise ValueError(f"backend node id: expected [A-Za-z0-9_]+, got {node_id!r}")
            if node_id in self.backends:
                raise ValueError(f"backend node id {node_id!r} given twice")
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"backend {node_id}: bad port {port!r}")
            self.backends[node_id] = (str(host), port)
        if not self.backends:
            raise ValueError("a balancer needs at least one backend")
        self.order = list(self.backends)
        self.mode = mode
        self.cookie_name = cookie_name
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.client_timeout = client_timeout
        self.down_for = down_for
        self.node_header = node_header
        self.stats: dict[str, Counter[str]] = {node: Counter() for node in self.order}
        self.failovers = 0
        self._down_until: dict[str, float] = {}
        self._turn = 0
        self._guard = threading.Lock()
        self._upstreams: set[http.client.HTTPConnection] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._serving = False
        self._stopped = threading.Event()

    # -- life cycle ------------------------------------------------------------------------

    def bind(self, host: str = "127.0.0.1", port: int = 0) -> "Balancer":
        """Open the listening socket (done by ``start``/``serve`` if not yet)."""
        if self._server is not None:
            raise RuntimeError("this balancer is already bound")
        handler = type("Handler", (_ProxyHandler,), {"balancer": self, "timeout": self.client_timeout})
        self._server = _Server((host, port), handler, self)
        return self

    def start(self, host: str = "127.0.0.1", port: int = 0) -> "Balancer":
        """Serve in a background thread; returns at once, listening."""
        if self._server is None:
            self.bind(host, port)
        self._serving = True
        self._thread = threading.Thread(target=self._loop, name="sessionstore-balancer", daemon=True)
        self._thread.start()
        return self

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve in this thread until :meth:`stop` (from another thread) or Ctrl-C."""
        if self._server is None:
            self.bind(host, port)
        self._serving = True
        try:
            self._loop()
        finally:
            self._close()

    def _loop(self) -> None:
        assert self._server is not None
        try:
            self._server.serve_forever(poll_interval=0.05)
        finally:
            self._stopped.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every connection, join every thread. Safe to call twice."""
        server = self._server
        if server is None:
            return
        if self._serving and not self._stopped.is_set():
            server.shutdown()  # returns when the serve loop has exited
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._close(timeout)

    def _close(self, timeout: float = 5.0) -> None:
        server = self._server
        if server is None:
            return
        with server.guard:
            server.closing = True
            connections = list(server.connections)
            threads = list(server.threads)
        server.server_close()
        with self._guard:
            upstreams = list(self._upstreams)
        for sock in connections:
            _shutdown(sock)
        for conn in upstreams:
            if conn.sock is not None:
                _shutdown(conn.sock)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = [t for t in threads if t.is_alive()]
        if left:
            _log.warning("balancer: %d connection threads still running after stop()", len(left))

    def __enter__(self) -> "Balancer":
        if self._server is None or not self._serving:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the balancer is not listening yet: call start() or bind() first")
        host, port = self._server.server_address[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        host, port = self.address
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    # -- routing ---------------------------------------------------------------------------

    def candidates(self, cookie_headers: Sequence[str] = ()) -> list[str]:
        """Node ids to try for a request, in order.

        Sticky with a known route: the routed node, then the nodes after it in
        the list. Otherwise round robin: the list rotated by one more each time.
        Nodes that refused a connection less than ``down_for`` seconds ago go last.
        """
        route = route_of(list(cookie_headers), self.cookie_name) if self.mode == "sticky" else None
        n = len(self.order)
        if route in self.backends:
            start = self.order.index(route)
        else:
            with self._guard:
                start, self._turn = self._turn % n, self._turn + 1
        ring = self.order[start:] + self.order[:start]
        now = time.monotonic()
        with self._guard:
            down = {node for node in ring if self._down_until.get(node, 0.0) > now}
        return [node for node in ring if node not in down] + [node for node in ring if node in down]

    def set_backend(self, node_id: str, host: str, port: int) -> None:
        """Change a backend's address (a node restarted elsewhere), or add one at the end of the list."""
        if not _NODE_ID.match(node_id) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"bad backend {node_id!r} {host}:{port}")
        with self._guard:
            if node_id not in self.backends:
                self.order = [*self.order, node_id]
                self.stats[node_id] = Counter()
            self.backends[node_id] = (str(host), port)
            self._down_until.pop(node_id, None)

    def is_down(self, node_id: str) -> bool:
        """Whether ``node_id`` refused a connection less than ``down_for`` seconds ago."""
        with self._guard:
            return self._down_until.get(node_id, 0.0) > time.monotonic()

    def _mark_down(self, node_id: str, error: BaseException) -> None:
        with self._guard:
            was_up = self._down_until.get(node_id, 0.0) <= time.monotonic()
            self._down_until[node_id] = time.monotonic() + self.down_for
            self.stats[node_id]["refused"] += 1
        if was_up:
            _log.warning("balancer: backend %s (%s:%d) is down (%s); trying the next one",
                         node_id, *self.backends[node_id], _reason(error))

    def _mark_up(self, node_id: str) -> None:
        with self._guard:
            self._down_until.pop(node_id, None)

    def _count(self, node_id: str, what: str) -> None:
        with self._guard:
            self.stats[node_id][what] += 1

    def _connect(self, node_id: str) -> http.client.HTTPConnection:
        host, port = self.backends[node_id]
        conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        conn.connect()
        conn.sock.settimeout(self.timeout)
        with self._guard:
            self._upstreams.add(conn)
        return conn

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._guard:
            self._upstreams.discard(conn)
        conn.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _drain(body: Iterator[bytes] | None, limit: int = 16 * 1024 * 1024) -> None:
    """Read and drop a request body nobody will get (up to ``limit`` bytes)."""
    if body is None:
        return
    read = 0
    try:
        for data in body:
            read += len(data)
            if read > limit:
                return
    except (OSError, _ClientBroke):
        pass


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _BadRequest(Exception):
    """The request cannot be forwarded as it is (answered 400)."""


class _ClientBroke(Exception):
    """The client's request body ended early or was malformed, after the backend got the headers."""


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """One client connection: one request, proxied, then the connection closes."""

    balancer: Balancer
    protocol_version = "HTTP/1.1"  # so that Expect: 100-continue is answered; we close anyway
    server_version = "sessionstore-balancer"

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("balancer: %s " + format, self.client_address[0], *args)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except OSError:
            self.close_connection = True  # client gone, or stop() shut the socket down
        finally:
            self.close_connection = True

    def do_GET(self) -> None:  # every method goes through here
        self.close_connection = True
        try:
            body = self._body()
        except _BadRequest as exc:
            self._answer(400, "bad-request", str(exc))
            return
        lb = self.balancer
        cookies = self.headers.get_all("Cookie") or []
        tried: list[str] = []
        for node in lb.candidates(cookies):
            try:
                conn = lb._connect(node)
            except OSError as exc:  # never reached the backend: the next one may take it
                lb._mark_down(node, exc)
                tried.append(node)
                continue
            lb._mark_up(node)
            if tried:
                with lb._guard:
                    lb.failovers += 1
            try:
                self._forward(node, conn, body)
            finally:
                lb._release(conn)
            return
        _drain(body)  # read what the client sent, so that it reads our answer (no reset)
        self._answer(503, "no-backend", f"no backend accepted the connection (tried {', '.join(tried)})")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    # -- request -------------------------------------------------------------------------------

    def _body(self) -> Iterator[bytes] | None:
        """The request body as an iterator of chunks (read lazily), or None."""
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        lengths = self.headers.get_all("Content-Length") or []
        if chunked:
            if lengths:
                raise _BadRequest("both Transfer-Encoding and Content-Length")
            return self._read_chunked()
        if not lengths:
            return None
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            raise _BadRequest(f"bad Content-Length {lengths!r}")
        length = int(lengths[0])
        return self._read_exactly(length) if length else None

    def _read_exactly(self, length: int) -> Iterator[bytes]:
        left = length
        while left:
            data = self.rfile.read(min(left, _CHUNK))
            if not data:
                raise _ClientBroke("the client closed the connection in the middle of the body")
            left -= len(data)
            yield data

    def _read_chunked(self) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16) if line.endswith(b"\n") else -1
            except ValueError:
                size = -1
            if size < 0:
                raise _ClientBroke(f"bad chunk size line {line[:40]!r}")
            if size == 0:
                while self.rfile.readline(8192).strip():  # trailers: dropped
                    pass
                return
            yield from self._read_exactly(size)
            self.rfile.readline(8)  # the CRLF after the chunk

    def _upstream_headers(self) -> list[tuple[str, str]]:
        connection_named = {
            token.strip().lower()
            for value in self.headers.get_all("Connection") or []
            for token in value.split(",")
        }
        headers = [
            (name, value) for name, value in self.headers.items()
            if name.lower() not in _REQUEST_DROPPED and name.lower() not in connection_named
            and name.lower() != "x-forwarded-for"
        ]
        forwarded = [v.strip() for v in self.headers.get_all("X-Forwarded-For") or [] if v.strip()]
        headers.append(("X-Forwarded-For", ", ".join([*forwarded, self.client_address[0]])))
        headers.append(("X-Forwarded-Proto", "http"))
        host = self.headers.get("Host")
        if host:
            headers.append(("X-Forwarded-Host", host))
        return headers

    # -- forwarding ----------------------------------------------------------------------------

    def _forward(self, node: str, conn: http.client.HTTPConnection, body: Iterator[bytes] | None) -> None:
        lb = self.balancer
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            headers = self._upstream_headers()
            if not any(name.lower() == "host" for name, _ in headers):
                host, port = lb.backends[node]
                conn.putheader("Host", f"{host}:{port}")
            for name, value in headers:
                conn.putheader(name, value)
            length = self.headers.get("Content-Length")
            chunked = body is not None and length is None
            if body is not None and length is not None:
                conn.putheader("Content-Length", length.strip())
            elif chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            elif self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", "0")
            conn.putheader("Connection", "close")
            conn.endheaders()
            if body is not None:
                for data in body:
                    conn.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                if chunked:
                    conn.send(b"0\r\n\r\n")
            response = conn.getresponse()
        except _ClientBroke as exc:
            _log.info("balancer: request to %s abandoned: %s", node, exc)
            self._answer(400, "bad-request", str(exc), node)  # if the client still listens
            return
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self._upstream_failed(node, exc)
            return
        self._relay(node, response)

    def _upstream_failed(self, node: str, exc: BaseException) -> None:
        lb = self.balancer
        lb._count(node, "errors")
        timeout = isinstance(exc, (TimeoutError, socket.timeout))
        kind = "backend-timeout" if timeout else "backend-failed"
        _log.warning("balancer: backend %s failed after the request was sent: %s", node, _reason(exc))
        self._answer(504 if timeout else 502, kind, f"backend {node}: {_reason(exc)}", node)

    def _relay(self, node: str, response: http.client.HTTPResponse) -> None:
        lb = self.balancer
        connection_named = {
            token.strip().lower()
            for value in response.msg.get_all("Connection") or []
            for token in value.split(",")
        }
        try:
            self.send_response_only(response.status, response.reason)
            for name, value in response.msg.items():
                low = name.lower()
                if low in _RESPONSE_DROPPED or low in connection_named:
                    continue
                if low == "content-length" and response.chunked:
                    continue
                self._header(name, value)
            if lb.node_header:
                self._header(lb.node_header, node)
            self._header("Connection", "close")
            self.end_headers()
            lb._count(node, "requests")
            self.log_request(response.status)
            if self.command == "HEAD":
                return
            while True:
                data = response.read1(_CHUNK)
                if not data:
                    break
                self.wfile.write(data)
        except (OSError, http.client.HTTPException) as exc:
            # the client went away, or the backend died while the body streamed:
            # the status line is out, so all that is left is to cut the connection
            _log.info("balancer: response from %s cut short: %s", node, _reason(exc))

    def _header(self, name: str, value: str) -> None:
        # send_header() would interpret Connection; write the line as it is
        self._headers_buffer.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))

    def _answer(self, status: int, kind: str, message: str, node: str | None = None) -> None:
        body = f"{status} {http.HTTPStatus(status).phrase}: {message}\n".encode()
        try:
            self.send_response_only(status)
            self._header("Content-Type", "text/plain; charset=utf-8")
            self._header("Content-Length", str(len(body)))
            self._header("X-Balancer-Error", kind)
            if node is not None and self.balancer.node_header:
                self._header(self.balancer.node_header, node)
            self._header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass


# -- command line ----------------------------------------------------------------------------


def _backend(text: str) -> tuple[str, str, int]:
    node_id, eq, address = text.partition("=")
    host, colon, port = address.rpartition(":")
    if not (eq and colon and port.isdigit() and _NODE_ID.match(node_id)):
        raise argparse.ArgumentTypeError(f"expected NODE_ID=HOST:PORT, got {text!r}")
    return node_id, host.strip("[]") or "127.0.0.1", int(port)


def _ctrl_c_interrupts() -> None:
    """Let Ctrl-C raise KeyboardInterrupt, even in a process started with SIGINT ignored.

    A background job of a shell without job control (``cmd &`` in a script)
    inherits SIG_IGN for SIGINT: the balancer could not be stopped with it.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    """``python -m sessionstore.balancer``: serve until Ctrl-C."""
    _ctrl_c_interrupts()
    parser = argparse.ArgumentParser(prog="python -m sessionstore.balancer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--backend", type=_backend, action="append", required=True, metavar="ID=HOST:PORT",
                        help="a backend node: its id (the cookie route) and address; repeat, in round-robin order")
    parser.add_argument("--mode", choices=MODES, default="non-sticky")
    parser.add_argument("--cookie-name", default="session")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    balancer = Balancer(args.backend, args.mode, cookie_name=args.cookie_name).bind(args.host, args.port)
    print(f"balancer ({args.mode}) on {balancer.url} -> "
          + ", ".join(f"{n}={h}:{p}" for n, h, p in args.backend), flush=True)
    try:
        balancer.serve()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

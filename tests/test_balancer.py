"""The load balancer (:mod:`sessionstore.balancer`) in front of real backend processes.

Each backend is this file run as a script: a werkzeug threaded server that
echoes what it received (raw header lines included), sets several cookies,
streams, sleeps, dies on request, and serves ``/session`` through a real
sticky-mode :class:`~sessionstore.SessionMiddleware`::

    python tests/test_balancer.py --node-id n1      # prints "READY <port>"
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs, urlencode

if __name__ == "__main__":  # run as a backend process: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
from werkzeug.serving import WSGIRequestHandler, make_server  # noqa: E402
from werkzeug.wsgi import get_input_stream  # noqa: E402

from sessionstore import SessionMiddleware, get_session  # noqa: E402
from sessionstore.balancer import Balancer, route_of  # noqa: E402
from sessionstore.ids import new_id  # noqa: E402
from sessionstore.signing import CookieSigner  # noqa: E402
from tests.servers.process import ignore_sigint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECRET = "balancer-test-secret"
NODES = ("n1", "n2", "n3")


# -- the backend (runs in its own process) ----------------------------------------------------


class _RawHeadersHandler(WSGIRequestHandler):
    """Puts the request's header lines, as received, into the environ; no access log."""

    def make_environ(self) -> dict:
        environ = super().make_environ()
        environ["test.raw_headers"] = [[name, value] for name, value in self.headers.items()]
        return environ

    def log(self, type: str, message: str, *args: Any) -> None:
        pass


def backend_app(node_id: str) -> Callable:
    def session_app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        session = get_session(environ)
        session["n"] = session.get("n", 0) + 1
        return _json(start_response, {"node": node_id, "n": session["n"]})

    sessions = SessionMiddleware(session_app, mode="sticky", node_id=node_id, store="memory://",
                                 secret_key=SECRET)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if path == "/session":
            return sessions(environ, start_response)
        if path == "/cookies":
            start_response("200 OK", [
                ("Content-Type", "text/plain"),
                ("Set-Cookie", "a=1; Path=/; HttpOnly"),
                ("Set-Cookie", "b=two; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/x; SameSite=Lax"),
                ("Set-Cookie", 'c="quoted value"; Max-Age=60; Secure'),
                ("X-Custom-Thing", "Mixed Case Value"),
                ("X-Repeated", "first"),
                ("X-Repeated", "second"),
                ("Cache-Control", "no-store"),
            ])
            return [b"three cookies\n"]
        if path == "/status":
            start_response(f"{query['code'][0]} {query['reason'][0]}", [("Content-Type", "text/plain"),
                                                                         ("Content-Length", "2")])
            return [b"ok"]
        if path == "/stream":  # no Content-Length: werkzeug sends it chunked
            start_response("200 OK", [("Content-Type", "text/plain")])
            return (f"line {i} from {node_id}\n".encode() for i in range(2000))
        if path == "/slow":
            time.sleep(float(query["seconds"][0]))
            return _json(start_response, {"node": node_id, "slept": True})
        if path == "/die":  # the process dies after reading the request, before answering
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)
        data = get_input_stream(environ).read()
        form = {}
        if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
            form = parse_qs(data.decode(), keep_blank_values=True)
        return _json(start_response, {
            "node": node_id,
            "method": environ["REQUEST_METHOD"],
            "uri": environ["REQUEST_URI"],
            "headers": environ["test.raw_headers"],
            "remote_addr": environ["REMOTE_ADDR"],
            "body_length": len(data),
            "body_sha256": hashlib.sha256(data).hexdigest(),
            "form": form,
        })

    return app


def _json(start_response: Callable, body: dict) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def backend_main(argv: list[str]) -> int:
    node_id = argv[argv.index("--node-id") + 1]
    server = make_server("127.0.0.1", 0, backend_app(node_id), threaded=True, request_handler=_RawHeadersHandler)

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), stop()), daemon=True).start()  # parent gone
    print(f"READY {server.server_port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
    return 0


# -- backend processes, from the tests ----------------------------------------------------------


@dataclass
class Backend:
    node_id: str
    proc: subprocess.Popen
    port: int = 0

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_backends(workdir: Path, node_ids: Iterable[str] = NODES) -> list[Backend]:
    """Start one backend process per node id (in parallel); ready when this returns."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    backends = []
    try:
        for node_id in node_ids:
            with open(workdir / f"backend-{node_id}.log", "ab") as log:
                proc = subprocess.Popen([sys.executable, __file__, "--node-id", node_id], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
            backends.append(Backend(node_id, proc))
        for backend in backends:
            line = backend.proc.stdout.readline().decode()  # type: ignore[union-attr]
            assert line.startswith("READY "), f"backend {backend.node_id} said {line!r}; see {workdir}"
            backend.port = int(line.split()[1])
    except BaseException:
        for backend in backends:
            backend.stop()
        raise
    return backends


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def node(self) -> str | None:
        return self.header("X-Balancer-Node")

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str, path: str, headers: list[tuple[str, str]] | None = None,
            body: bytes | Iterable[bytes] | None = None, chunked: bool = False) -> Reply:
    """One request on its own connection; header lines sent exactly as given (repeats too)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, path, skip_host=any(k.lower() == "host" for k, _ in headers or []),
                        skip_accept_encoding=True)
        for name, value in headers or []:
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif isinstance(body, bytes):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if chunked:
            for chunk in body or []:  # type: ignore[union-attr]
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        elif body:
            conn.send(body)  # type: ignore[arg-type]
        response = conn.getresponse()
        return Reply(response.status, response.reason, response.getheaders(), response.read())
    finally:
        conn.close()


def get(port: int, path: str = "/echo", cookie: str | None = None) -> Reply:
    return request(port, "GET", path, [("Cookie", f"session={cookie}")] if cookie else [])


def sticky_cookie(node_id: str) -> str:
    """A real sessionstore cookie value routed to ``node_id``: ``<random+signature>.<node_id>``."""
    return CookieSigner([SECRET]).sign(new_id(node_id))


def balancer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sessionstore-balancer")]


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backends(tmp_path_factory) -> Iterator[list[Backend]]:
    """n1, n2, n3, shared by the tests that kill none."""
    started = start_backends(tmp_path_factory.mktemp("backends"))
    yield started
    for backend in started:
        backend.stop()


@pytest.fixture
def own_backends(tmp_path) -> Iterator[list[Backend]]:
    """n1, n2, n3 of this test's own, for tests that kill some."""
    started = start_backends(tmp_path)
    yield started
    for backend in started:
        backend.stop()


def lb_for(backends: list[Backend], mode: str = "non-sticky", **options: Any) -> Balancer:
    return Balancer([(b.node_id, "127.0.0.1", b.port) for b in backends], mode, **options).start()


# -- routing ---------------------------------------------------------------------------------------


def test_round_robin_spreads_requests_in_turn(backends):
    with lb_for(backends) as lb:
        replies = [get(lb.port) for _ in range(9)]
        assert all(r.status == 200 for r in replies)
        served = [r.json["node"] for r in replies]
        assert [r.node for r in replies] == served  # X-Balancer-Node names the backend that answered
        assert served[:3] in (["n1", "n2", "n3"], ["n2", "n3", "n1"], ["n3", "n1", "n2"])
        assert served == served[:3] * 3
        # a routed session cookie changes nothing in non-sticky mode
        assert len({get(lb.port, cookie=sticky_cookie("n2")).node for _ in range(3)}) == 3
        # and parallel requests are spread evenly too
        with ThreadPoolExecutor(12) as pool:
            nodes = list(pool.map(lambda _: get(lb.port).node, range(30)))
        assert {n: nodes.count(n) for n in NODES} == {"n1": 10, "n2": 10, "n3": 10}
        assert sum(lb.stats[n]["requests"] for n in NODES) == 9 + 3 + 30


def test_sticky_routes_by_the_session_cookie_suffix(backends):
    with lb_for(backends, "sticky") as lb:
        # a real sticky session: the node that creates it names itself in the cookie
        first = get(lb.port, "/session")
        owner = first.node
        cookie = next(c for c in first.all("Set-Cookie") if c.startswith("session="))
        value = cookie.split(";")[0].removeprefix("session=")
        assert value.endswith(f".{owner}") and value.count(".") == 1
        counts = [get(lb.port, "/session", value) for _ in range(10)]
        assert {r.node for r in counts} == {owner}
        assert [r.json["n"] for r in counts] == list(range(2, 12))  # the session never left its node
        # every route goes where it says, however round robin stands
        for node in ("n3", "n1", "n2", "n2", "n3"):
            assert get(lb.port, cookie=sticky_cookie(node)).node == node
        # no route, an unknown node, a route that is no node id, another cookie's dot: round robin
        for cookie_value in (CookieSigner([SECRET]).sign(new_id()), sticky_cookie("n9"), "abc.n-1", "abc.", None):
            assert len({get(lb.port, cookie=cookie_value).node for _ in range(3)}) == 3
        assert len({request(lb.port, "GET", "/echo", [("Cookie", "other=x.n2")]).node for _ in range(3)}) == 3


def test_route_of_reads_the_text_after_the_dot_of_the_session_cookie():
    value = sticky_cookie("n2")
    assert route_of(f"session={value}") == "n2"
    assert route_of(f"a=1; session={value}; b=x.n3") == "n2"
    assert route_of(f'session="{value}"') == "n2"
    assert route_of(["a=b.n3", f"session={value}"]) == "n2"  # several Cookie headers
    assert route_of(f"session={value}; session=x.n3") == "n2"  # the first one wins, as in the middleware
    assert route_of(f"sid={value}", cookie_name="sid") == "n2"
    for header in (None, "", "session=abc", "session=.n1", "session=abc.", "session=abc.n-1", f"sessions={value}"):
        assert route_of(header) is None, header


def test_failover_to_the_next_live_node_when_the_routed_one_is_killed(own_backends):
    n1, n2, n3 = own_backends
    with lb_for(own_backends, "sticky", down_for=60) as lb:
        on_n2 = sticky_cookie("n2")
        assert get(lb.port, cookie=on_n2).node == "n2"
        n2.kill()
        replies = [get(lb.port, cookie=on_n2) for _ in range(5)]
        assert [(r.status, r.node) for r in replies] == [(200, "n3")] * 5  # the node after n2
        assert lb.is_down("n2") and lb.stats["n2"]["refused"] == 1  # tried once, then skipped
        assert lb.failovers == 1
        # round robin goes on over the live ones
        assert {get(lb.port).node for _ in range(6)} == {"n1", "n3"}
        # the last node's next one is the first
        n3.kill()
        assert [get(lb.port, cookie=sticky_cookie("n3")).node for _ in range(3)] == ["n1"] * 3
        n1.kill()
        down = get(lb.port, cookie=on_n2)
        assert down.status == 503 and down.header("X-Balancer-Error") == "no-backend"
        # a client still sending its body reads the answer too
        posted = request(lb.port, "POST", "/echo", [("Content-Type", "application/octet-stream")], b"x" * 500_000)
        assert posted.status == 503


def test_failover_in_non_sticky_mode_and_a_node_that_comes_back(own_backends, tmp_path):
    n1, n2, n3 = own_backends
    with lb_for(own_backends, down_for=0.2) as lb:
        n1.kill()
        replies = [get(lb.port) for _ in range(8)]
        assert all(r.status == 200 for r in replies)
        assert {r.node for r in replies} == {"n2", "n3"}
        # a backend that takes the request and dies before answering: 502, never replayed elsewhere
        died = get(lb.port, "/die")
        assert died.status == 502 and died.header("X-Balancer-Error") == "backend-failed"
        victim = died.node
        assert victim in ("n2", "n3")
        survivor = next(b for b in (n2, n3) if b.node_id != victim)
        assert lb.stats[victim]["errors"] == 1 and lb.stats[survivor.node_id]["errors"] == 0
        # n1 comes back on its port: once down_for has passed, it gets requests again
        restarted = start_backends(tmp_path, ["n1"])[0]
        try:
            lb.set_backend("n1", "127.0.0.1", restarted.port)
            time.sleep(0.3)
            assert {get(lb.port).node for _ in range(4)} == {"n1", survivor.node_id}
        finally:
            restarted.stop()


# -- forwarding ------------------------------------------------------------------------------------


def test_response_headers_come_back_as_sent_with_every_set_cookie(backends):
    with lb_for(backends) as lb:
        reply = get(lb.port, "/cookies")
        assert reply.status == 200 and reply.body == b"three cookies\n"
        assert reply.all("Set-Cookie") == [
            "a=1; Path=/; HttpOnly",
            "b=two; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/x; SameSite=Lax",
            'c="quoted value"; Max-Age=60; Secure',
        ]
        names = [name for name, _ in reply.headers]
        assert "X-Custom-Thing" in names and reply.header("X-Custom-Thing") == "Mixed Case Value"
        assert reply.all("X-Repeated") == ["first", "second"]
        assert reply.header("Cache-Control") == "no-store"
        assert reply.header("Server", ).startswith("Werkzeug/")  # the backend's, not the balancer's
        assert reply.all("Connection") == ["close"]
        # status code and reason phrase as the backend said them
        teapot = get(lb.port, "/status?" + urlencode({"code": 418, "reason": "Short And Stout"}))
        assert (teapot.status, teapot.reason, teapot.body) == (418, "Short And Stout", b"ok")
        # a streamed (chunked) body arrives whole
        stream = get(lb.port, "/stream")
        lines = stream.body.decode().splitlines()
        assert len(lines) == 2000 and lines[-1] == f"line 1999 from {stream.node}"
        assert stream.header("Transfer-Encoding") is None  # re-framed: the connection's end ends the body


def test_request_headers_are_forwarded_and_x_forwarded_added(backends):
    with lb_for(backends) as lb:
        sent = [
            ("Host", "shop.example:8443"),
            ("Cookie", "session=abc; theme=dark"),
            ("X-Dup", "one"),
            ("x-dup", "two"),
            ("User-Agent", "test-agent/1.0"),
            ("Authorization", "Bearer t0ken"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),  # a client must not make the app believe it is on https
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "connection-only"),
            ("Keep-Alive", "timeout=5"),
            ("Upgrade", "websocket"),
            ("TE", "trailers"),
        ]
        echo = request(lb.port, "GET", "/echo/a%2Fb?x=1&x=2&y=%20z", sent).json
        received = [tuple(h) for h in echo["headers"]]
        assert echo["uri"] == "/echo/a%2Fb?x=1&x=2&y=%20z" and echo["method"] == "GET"
        kept = [h for h in sent[:6]]
        assert [h for h in received if h in kept] == kept  # same lines, same case, same order, repeats kept
        names = {name.lower() for name, _ in received}
        assert not names & {"x-hop", "keep-alive", "upgrade", "te"}
        assert ("X-Forwarded-For", "203.0.113.7, 127.0.0.1") in received
        assert ("X-Forwarded-Proto", "http") in received
        assert ("X-Forwarded-Host", "shop.example:8443") in received
        assert [v for n, v in received if n.lower() == "x-forwarded-proto"] == ["http"]
        assert [v for n, v in received if n.lower() == "connection"] == ["close"]
        # without a client X-Forwarded-For, the client's address alone
        plain = request(lb.port, "GET", "/echo").json
        assert ["127.0.0.1"] == [v for n, v in plain["headers"] if n == "X-Forwarded-For"]
        assert any(n.lower() == "host" for n, _ in plain["headers"])


def test_request_bodies_are_forwarded(backends):
    with lb_for(backends) as lb:
        form = {"user": "alice", "note": "a & b = c", "empty": ""}
        data = urlencode(form).encode()
        echo = request(lb.port, "POST", "/echo", [("Content-Type", "application/x-www-form-urlencoded")], data).json
        assert echo["method"] == "POST"
        assert echo["form"] == {k: [v] for k, v in form.items()}
        assert ("Content-Length", str(len(data))) in [tuple(h) for h in echo["headers"]]

        blob = os.urandom(3 * 1024 * 1024 + 17)
        echo = request(lb.port, "PUT", "/echo", [("Content-Type", "application/octet-stream")], blob).json
        assert echo["method"] == "PUT" and echo["body_length"] == len(blob)
        assert echo["body_sha256"] == hashlib.sha256(blob).hexdigest()

        chunks = [b"first,", b"", b"x" * 100_000, b",last"]
        joined = b"".join(chunks)
        echo = request(lb.port, "POST", "/echo", [("Content-Type", "text/plain")],
                       [c for c in chunks if c], chunked=True).json
        assert echo["body_length"] == len(joined) and echo["body_sha256"] == hashlib.sha256(joined).hexdigest()

        # Expect: 100-continue is answered by the balancer; the body still arrives
        conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        conn.request("POST", "/echo", body=b"after continue", headers={"Expect": "100-continue"})
        echo = json.loads(conn.getresponse().read())
        conn.close()
        assert echo["body_length"] == len(b"after continue")

        head = request(lb.port, "HEAD", "/echo")
        assert head.status == 200 and head.body == b"" and int(head.header("Content-Length")) > 0

        bad = request(lb.port, "POST", "/echo", [("Content-Length", "12"), ("Content-Length", "13")])
        assert bad.status == 400


# -- life cycle ------------------------------------------------------------------------------------


def test_stop_closes_connections_and_joins_threads(backends):
    before = set(threading.enumerate())
    lb = lb_for(backends)
    port = lb.port
    assert get(port).status == 200
    idle = socket.create_connection(("127.0.0.1", port))  # a client that never sends its request
    slow_result: list[Any] = []

    def slow() -> None:
        try:
            slow_result.append(get(port, "/slow?seconds=20"))
        except (OSError, http.client.HTTPException) as exc:
            slow_result.append(exc)

    waiting = threading.Thread(target=slow)
    waiting.start()
    deadline = time.monotonic() + 5
    while len(balancer_threads()) < 3 and time.monotonic() < deadline:  # the loop, idle, slow
        time.sleep(0.01)
    assert len(balancer_threads()) >= 3

    started = time.monotonic()
    lb.stop()
    assert time.monotonic() - started < 5  # did not wait for the slow backend
    waiting.join(5)
    assert not waiting.is_alive() and slow_result and not isinstance(slow_result[0], Reply)
    idle.settimeout(5)
    assert idle.recv(100) == b""  # the balancer closed the idle connection
    idle.close()
    assert balancer_threads() == []
    assert set(threading.enumerate()) <= before | {threading.current_thread()}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    lb.stop()  # twice is harmless


def test_serve_in_a_thread_of_ones_own_and_bad_arguments(backends):
    lb = Balancer([(b.node_id, "127.0.0.1", b.port) for b in backends]).bind("127.0.0.1", 0)
    serving = threading.Thread(target=lb.serve)
    serving.start()
    assert get(lb.port).status == 200 and lb.url == f"http://127.0.0.1:{lb.port}/"
    lb.stop()
    serving.join(5)
    assert not serving.is_alive() and balancer_threads() == []

    for backends_, mode in [([], "sticky"), ([("n1", "h", 1)], "round-robin"), ([("n-1", "h", 1)], "sticky"),
                            ([("n1", "h", 1), ("n1", "h", 2)], "sticky"), ([("n1", "h", 0)], "sticky")]:
        with pytest.raises(ValueError):
            Balancer(backends_, mode)


def test_balancer_as_a_process(backends, tmp_path):
    port_probe = socket.socket()
    port_probe.bind(("127.0.0.1", 0))
    port = port_probe.getsockname()[1]
    port_probe.close()
    argv = [sys.executable, "-m", "sessionstore.balancer", "--port", str(port), "--mode", "sticky",
            *[arg for b in backends for arg in ("--backend", f"{b.node_id}=127.0.0.1:{b.port}")]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            preexec_fn=ignore_sigint)  # as from a script's `&`: Ctrl-C must work all the same
    try:
        assert "balancer (sticky)" in proc.stdout.readline().decode()  # type: ignore[union-attr]
        assert get(port, cookie=sticky_cookie("n3")).node == "n3"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    sys.exit(backend_main(sys.argv[1:]))

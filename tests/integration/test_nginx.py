"""Real nginx in front of real app nodes, with the configurations of ``examples/nginx/``.

Each test renders one example (``{{listen}}``, ``{{n1}}`` … replaced by
loopback addresses), wraps it in a minimal main configuration and starts
``nginx -g 'daemon off;'`` in a temporary prefix, in front of three node
processes (``n1``, ``n2``, ``n3``) sharing the session-wide Redis. A client
keeping cookies in a :class:`http.cookiejar.CookieJar` drives it over HTTP;
every response says which node served it. Nodes are SIGKILLed; every process
started here is stopped by pid at the end, whatever happens.

The node app is this module run as a program::

    python -c '…serve(sys.argv[1:])' --port P --node-id n1 --mode sticky --store URL --secret S
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pytest
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import WSGIRequestHandler, make_server

from sessionstore import SessionMiddleware, get_session
from tests.servers.process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "nginx"
SECRET = "nginx-example-secret"
NODES = ("n1", "n2", "n3")
COOKIE = "session"


# -- the app node ---------------------------------------------------------------------------------


class NodeApp:
    """``/inc``: ``n += 1``, answers ``{"node", "n", "id"}``; ``/health``: ``{"node"}``, no session."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            body: dict[str, Any] = {"node": self.node_id}
        elif path == "/inc":
            session = get_session(environ)
            session["n"] = session.get("n", 0) + 1
            body = {"node": self.node_id, "n": session["n"], "id": session.id}
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        data = json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                                  ("X-Node", self.node_id)])
        return [data]


def serve(argv: list[str]) -> None:
    """Serve one node until killed: the middleware behind werkzeug's ProxyFix, as in docs/load-balancers.md."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--mode", choices=("sticky", "non-sticky"), required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    route = {"node_id": args.node_id, "backup": "sync"} if args.mode == "sticky" else {}
    sessions = SessionMiddleware(NodeApp(args.node_id), mode=args.mode, store=args.store,
                                 secret_key=args.secret, debug=True, **route)
    app = ProxyFix(sessions, x_for=1, x_proto=1)

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args: Any) -> None:
            pass

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    make_server("127.0.0.1", args.port, app, threaded=True, request_handler=Quiet).serve_forever()


def start_node(workdir: Path, node_id: str, mode: str, store: str) -> ServerProcess:
    """One node process on a free port; returns once it accepts connections."""
    port = free_port()
    boot = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from tests.integration.test_nginx import serve; serve(sys.argv[1:])")
    argv = [sys.executable, "-c", boot, "--port", str(port), "--node-id", node_id, "--mode", mode,
            "--store", store, "--secret", SECRET]
    return ServerProcess(argv, port, workdir).start(timeout=30)


# -- nginx ----------------------------------------------------------------------------------------


def nginx_binary() -> str:
    """The nginx executable; missing is a failure (scripts/test installs the Debian package)."""
    for path in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError("nginx is not installed: run scripts/test (it installs the Debian package)")


def render(example: str, listen: int, nodes: dict[str, int]) -> str:
    """The example file with its placeholders filled in."""
    text = (EXAMPLES / example).read_text()
    text = text.replace("{{listen}}", f"127.0.0.1:{listen}")
    for node_id, port in nodes.items():
        text = text.replace("{{%s}}" % node_id, f"127.0.0.1:{port}")
    assert "{{" not in text, f"{example}: placeholder left unfilled"
    return text


def start_nginx(workdir: Path, example: str, nodes: dict[str, int]) -> ServerProcess:
    """nginx in the foreground with ``example`` included in a minimal main configuration."""
    binary = nginx_binary()
    port = free_port()
    site = workdir / example
    site.write_text(render(example, port, nodes))
    temp = workdir / "temp"
    temp.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = workdir / "nginx.conf"
    main.write_text(
        f"{user}worker_processes 1;\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        "    log_format upstream '$request $status upstream=$upstream_addr $upstream_status';\n"
        f"    access_log {workdir}/access.log upstream;\n"
        + "".join(f"    {kind}_temp_path {temp}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"    include {site};\n"
        "}\n"
    )
    argv = [binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(main)]
    checked = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx -t rejected {example}:\n{checked.stderr}"
    return ServerProcess([*argv, "-g", "daemon off;"], port, workdir).start(timeout=15)


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (nginx's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def stop_nginx(process: ServerProcess) -> None:
    """SIGTERM the master, which stops its workers; a worker still alive then is SIGKILLed by pid."""
    workers = _children(process.pid) if process.alive else []
    process.stop()
    for pid in workers:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx: worker"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # gone already


@dataclass
class Site:
    """nginx at ``port`` in front of ``nodes`` n1, n2, n3 (node id -> process), and any extra nodes."""

    port: int
    nodes: dict[str, ServerProcess]

    def kill(self, node_id: str) -> None:
        """SIGKILL a node: nothing is flushed, nothing is closed."""
        self.nodes[node_id].kill()


@pytest.fixture
def site_factory(tmp_path: Path) -> Iterator[Callable[..., Site]]:
    """``make(example, mode, store_url, extra=())``: nodes n1-n3 behind nginx, plus ``extra`` nodes
    nginx does not know; all stopped by pid at the end of the test, passed or failed."""
    with ExitStack() as cleanup:

        def make(example: str, mode: str, store: str, extra: tuple[str, ...] = ()) -> Site:
            nodes = {}
            for node_id in (*NODES, *extra):
                node = start_node(tmp_path, node_id, mode, store)
                cleanup.callback(node.stop)
                nodes[node_id] = node
            nginx = start_nginx(tmp_path, example, {n: nodes[n].port for n in NODES})
            cleanup.callback(stop_nginx, nginx)
            return Site(nginx.port, nodes)

        yield make


# -- the client -----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: http.client.HTTPMessage

    @property
    def node(self) -> str:
        return self.body["node"]

    @property
    def causes(self) -> list[str]:
        header = self.headers.get("X-Session-Debug", "")
        fields = dict(part.strip().split("=", 1) for part in header.split(";") if "=" in part)
        return [c for c in fields.get("causes", "").split(",") if c]


class Client:
    """A browser: keeps cookies in a CookieJar, no proxy from the environment."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                  urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with self.opener.open(request, timeout=30) as response:
                return Answer(response.status, json.loads(response.read()), response.headers)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"GET {path}: {exc.code} {exc.read()[:300]!r}") from None

    def inc(self) -> Answer:
        return self.get("/inc")

    @property
    def cookie(self) -> str | None:
        return next((c.value for c in self.jar if c.name == COOKIE), None)

    @property
    def route(self) -> str | None:
        """The text after the cookie value's dot (sticky mode), or None."""
        value = self.cookie
        return value.rpartition(".")[2] if value and "." in value else None


def run(client: Client, count: int, start: int) -> list[Answer]:
    """``count`` increments that must read ``start + 1``, ``start + 2``, …: nothing lost, nothing doubled."""
    answers = []
    for i in range(1, count + 1):
        answer = client.inc()
        assert answer.body["n"] == start + i, f"increment {start + i} read {answer.body['n']} on {answer.node}"
        answers.append(answer)
    return answers


def settle(client: Client, start: int, limit: int = 200) -> list[Answer]:
    """Increment until five requests in a row land on the node named by the cookie's route."""
    answers: list[Answer] = []
    while len(answers) < limit:
        answers += run(client, 1, start + len(answers))
        last = answers[-5:]
        if len(last) == 5 and {a.node for a in last} == {client.route}:
            return answers
    raise AssertionError(f"no stable node after {limit} requests: {[a.node for a in answers]}")


# -- round-robin, non-sticky -------------------------------------------------------------------


def test_round_robin_spreads_one_session_over_every_node(site_factory, redis_server) -> None:
    """Non-sticky on Redis: consecutive requests of one session land on different nodes and the
    counter never skips; a SIGKILLed node's requests go to the others (proxy_next_upstream)."""
    site = site_factory("round-robin.conf", "non-sticky", redis_server.url)
    client = Client(site.port)

    answers = run(client, 21, 0)
    served = [a.node for a in answers]
    assert set(served) == set(NODES), served
    assert all(a != b for a, b in zip(served, served[1:])), f"round-robin repeated a node: {served}"
    cookie = client.cookie
    assert cookie is not None and "." not in cookie  # non-sticky ids carry no route
    assert {a.body["id"] for a in answers} == {answers[0].body["id"]}

    site.kill("n2")
    after = run(client, 12, 21)
    assert {a.node for a in after} == {"n1", "n3"}
    assert client.cookie == cookie  # same session, same id


def test_round_robin_overwrites_a_spoofed_forwarded_proto(site_factory, redis_server) -> None:
    """The node trusts X-Forwarded-Proto (ProxyFix), so nginx must set it, never pass the client's:
    a client claiming https over plain http must not get a Secure cookie it would never send back."""
    site = site_factory("round-robin.conf", "non-sticky", redis_server.url)
    spoof = {"X-Forwarded-Proto": "https"}

    direct = Client(site.nodes["n1"].port).get("/inc", spoof)  # no nginx: the node believes it
    assert "secure" in direct.headers["Set-Cookie"].lower()

    through = Client(site.port).get("/inc", spoof)
    assert "secure" not in through.headers["Set-Cookie"].lower(), through.headers["Set-Cookie"]


# -- hash $cookie_session consistent ---------------------------------------------------------------


def test_hash_cookie_non_sticky_keeps_a_session_on_one_node(site_factory, redis_server) -> None:
    """Non-sticky: once the client has its cookie every request hashes to one node; when that node
    is SIGKILLed, the session's requests move to one other node and the counter carries on."""
    site = site_factory("hash-cookie.conf", "non-sticky", redis_server.url)
    client = Client(site.port)

    answers = run(client, 20, 0)
    owners = {a.node for a in answers[1:]}  # the first request had no cookie: any node
    assert len(owners) == 1, [a.node for a in answers]
    owner = owners.pop()

    site.kill(owner)
    after = run(client, 10, 20)
    moved = {a.node for a in after}
    assert len(moved) == 1 and owner not in moved, [a.node for a in after]


def test_hash_cookie_new_sessions_start_on_every_node(site_factory, redis_server) -> None:
    """A first request has no cookie (empty hash key): nginx balances it round-robin, so new
    sessions do not all start on the node the empty string hashes to."""
    site = site_factory("hash-cookie.conf", "non-sticky", redis_server.url)
    first = [Client(site.port).inc().node for _ in range(6)]
    assert set(first) == set(NODES), first


def test_hash_cookie_sticky_converges_and_fails_over(site_factory, redis_server) -> None:
    """Sticky (sync backup): the hash ignores routes, so a new session may fail over a few times
    (route-changed, id reissued) until its cookie hashes to the node that issued it; nothing is
    lost on the way. After SIGKILL of that node the next requests still see every increment."""
    site = site_factory("hash-cookie.conf", "sticky", redis_server.url)
    client = Client(site.port)

    answers = settle(client, 0)
    for answer in answers:
        assert answer.body["id"].endswith("." + answer.node)
    owner = client.route

    site.kill(owner)
    n = len(answers)
    first = run(client, 1, n)[0]
    assert first.node != owner and "route-changed" in first.causes
    after = settle(client, n + 1)
    assert client.route != owner and owner not in {a.node for a in after}


# -- route stickiness on the cookie's .<node_id> -----------------------------------------------------


def test_route_sticky_follows_the_route_and_fails_over(site_factory, redis_server) -> None:
    """Sticky (sync backup): new sessions start round-robin on every node; each session then stays
    on the node named by its cookie's route. SIGKILL that node: the next request lands on another
    node, which takes the session over from the store (every acknowledged increment there) and
    reissues the cookie with its own route; later requests follow the new route. Sessions of the
    other nodes are not touched."""
    site = site_factory("route-sticky.conf", "sticky", redis_server.url)
    clients = [Client(site.port) for _ in NODES]
    for client in clients:
        client.inc()
    owners = [client.route for client in clients]
    assert sorted(owners) == sorted(NODES), owners  # round-robin for cookieless requests

    client = clients[0]
    owner = client.route
    answers = run(client, 20, 1)
    assert {a.node for a in answers} == {owner}
    assert not any("route-changed" in a.causes for a in answers)
    cookie = client.cookie
    assert cookie.count(".") == 1 and cookie.endswith("." + owner)

    site.kill(owner)
    failover = run(client, 1, 21)[0]
    assert failover.node != owner
    assert "route-changed" in failover.causes
    assert client.route == failover.node and client.cookie != cookie
    assert failover.body["id"].endswith("." + failover.node)

    after = run(client, 10, 22)
    assert {a.node for a in after} == {failover.node}
    assert not any("route-changed" in a.causes for a in after)

    for other, route in zip(clients[1:], owners[1:]):
        if route == owner:
            continue
        answer = run(other, 1, 1)[0]
        assert answer.node == route and not answer.causes and other.route == route


def test_route_sticky_sends_an_unknown_route_round_robin(site_factory, redis_server) -> None:
    """A session issued by a node nginx does not know (n9, removed from the map) goes to the
    round-robin upstream; the node there takes it over and reissues the id with its own route."""
    site = site_factory("route-sticky.conf", "sticky", redis_server.url, extra=("n9",))
    client = Client(site.nodes["n9"].port)  # straight to n9, not through nginx
    run(client, 3, 0)
    assert client.route == "n9"

    client.base = f"http://127.0.0.1:{site.port}"  # same cookie jar, now through nginx
    taken = run(client, 1, 3)[0]
    assert taken.node in NODES and "route-changed" in taken.causes
    assert client.route == taken.node
    after = run(client, 5, 4)
    assert {a.node for a in after} == {taken.node}

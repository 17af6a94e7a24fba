"""The demo: two node processes behind a load balancer, sharing sessions through a store.

``sessionstore demo`` starts, on localhost:

* two **node** processes (``python -m sessionstore.demo node --node-id n1 ...``),
  each serving :func:`build_app` with werkzeug's threaded server;
* a :class:`~sessionstore.balancer.Balancer` in front of them, in this process:
  round robin (``--mode non-sticky``) or by the route at the end of the session
  cookie (``--mode sticky``);
* on the embedded ``local://`` store (every process of this host shares it) in
  a temporary directory, unless ``--store`` names Redis, memcached or another
  store.

and prints the URL to open. The page says which node served it, shows the
session (the hash of its id, never the id), the counter, the cart and the
request's debug record. ``--kill-node`` adds a button that SIGKILLs the node
answering it; the demo restarts a node that died a few seconds later. Ctrl-C
stops the nodes (by pid) and the balancer.

``sessionstore demo --selftest`` starts the same thing on free ports, walks
through it with an HTTP client through the balancer (first visit, a counter on
both nodes, an in-place cart change, login, logout, forged cookies, the debug
record, and a node killed with SIGKILL), prints ``ok``/``FAIL`` per step, stops
every process it started and exits 0 only when every step passed.

The app itself is plain WSGI: :class:`DemoApp` is all a newcomer needs to read.
"""

from __future__ import annotations

import argparse
import html
import http.client
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs

from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import WSGIRequestHandler, make_server

from . import SessionMiddleware, Settings, get_session
from .balancer import Balancer
from .debug import log_id
from .errors import ConfigError, StoreError
from .signing import CookieSigner, Verdict

__all__ = [
    "DEMO_SECRET_KEY", "KEY_PREFIX", "NODE_IDS", "DemoApp", "build_app", "DemoCluster",
    "SelfTest", "selftest", "serve", "main",
]

#: Published in the source, so it protects nothing: demo only.
DEMO_SECRET_KEY = "sessionstore-demo-key-not-secret"
#: The demo's keys in the store, apart from an application's own sessions.
KEY_PREFIX = "sessionstore-demo:"
#: The two nodes, in the balancer's round-robin order.
NODE_IDS = ("n1", "n2")
MODES = ("non-sticky", "sticky")
#: Where :func:`expose_debug_header` puts this request's ``X-Session-Debug`` value.
DEBUG_KEY = "demo.session_debug"
#: Seconds after which the interactive demo restarts a node that died.
RESTART_DELAY = 3.0
#: What a node prints on stdout once it listens: ``READY <port>``.
READY = "READY"

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


# -- the app (one node) ------------------------------------------------------------------------


class DemoApp:
    """The WSGI app each node serves, inside :class:`SessionMiddleware`.

    ``/`` counts visits, ``/cart/add?item=`` adds to a cart, ``/login?user=``
    logs in (the id rotates), ``/logout`` invalidates, ``/json`` reads. Every
    page answers JSON instead of HTML when the request accepts
    ``application/json``. ``POST /_demo/kill`` (only with ``kill_button``)
    kills this node's process with SIGKILL once the answer is sent.
    """

    def __init__(self, node_id: str, mode: str, kill_button: bool = False) -> None:
        self.node_id = node_id
        self.mode = mode
        self.kill_button = kill_button

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path.startswith("/static/"):
            return static_file(environ, start_response)
        if path == "/_demo/kill":
            return self.kill(environ, start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""))
        session = get_session(environ)
        message = ""

        if path == "/":
            # Changed in place, never assigned: the session notices and saves it anyway.
            session.setdefault("stats", {"visits": 0})["visits"] += 1
        elif path == "/cart/add":
            item = query.get("item", ["apple"])[0]
            session.setdefault("cart", {"items": []})["items"].append(item)
            message = f"Added {item!r} to the cart."
        elif path == "/login":
            session["user"] = query.get("user", ["alice"])[0]
            session.rotate()  # new id, same data: an id seen before login is worthless after it
            message = f"Logged in as {session['user']!r}; the session id changed."
        elif path == "/logout":
            session.invalidate()  # deleted from the store; the browser's cookie is deleted
            message = "Logged out: the session is gone and its cookie deleted."
        elif path != "/json":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"Not found. Try / or /json.\n"]

        state = self.state(session)
        as_json = path == "/json" or _wants_json(environ)
        content_type = "application/json" if as_json else "text/html; charset=utf-8"
        # The middleware saves the session here, before any header goes out, and adds
        # Set-Cookie and X-Session-Debug; so the page is rendered after this call.
        start_response("200 OK", [("Content-Type", content_type), ("Cache-Control", "no-store")])
        header = environ.get(DEBUG_KEY, "")
        state["debug"] = parse_debug_header(header)
        state["record"] = self.record(environ)
        if as_json:
            return [json.dumps(state, default=str).encode()]
        return [render_page(state, message, header, self.kill_button).encode()]

    def state(self, session: Any) -> dict[str, Any]:
        """What the pages show. Never the session id itself: only the hash the debug log uses."""
        return {
            "node": self.node_id,
            "pid": os.getpid(),
            "mode": self.mode,
            "sid": log_id(session.id),
            "is_new": session.is_new,
            "visits": session.get("stats", {}).get("visits", 0),
            "cart": session.get("cart", {}).get("items", []),
            "user": session.get("user"),
        }

    def record(self, environ: dict) -> dict[str, Any]:
        """This request's debug record so far (``store_ops`` and ``ms`` are final in the node's log)."""
        record = environ.get("sessionstore.record")
        if record is None:
            return {}
        data = record.as_dict(self.node_id, self.mode)
        data.pop("ms", None)
        data.pop("store_ops", None)
        return data

    def kill(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """``POST /_demo/kill``: answer, then SIGKILL this process (nothing saved, nothing closed)."""
        if not self.kill_button:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"Not found: start the demo with --kill-node for the kill button.\n"]
        if environ.get("REQUEST_METHOD") != "POST":
            start_response("405 Method Not Allowed", [("Allow", "POST"), ("Content-Type", "text/plain")])
            return [b"POST only.\n"]
        answer = {"killed": self.node_id, "pid": os.getpid()}
        if _wants_json(environ):
            body, content_type = json.dumps(answer), "application/json"
        else:
            body, content_type = render_killed(self.node_id, os.getpid()), "text/html; charset=utf-8"
        data = body.encode()
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(data))),
                                  ("Cache-Control", "no-store")])
        return _KillAfter([data])


class _KillAfter:
    """A response body that SIGKILLs this process shortly after the server sent it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        # a moment for the answer to leave the socket before the process vanishes
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()


def _wants_json(environ: dict) -> bool:
    return "application/json" in environ.get("HTTP_ACCEPT", "")


def static_file(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """Everything under /static/ matches ``ignore_pattern``: no session, no cookie, no store call."""
    try:
        get_session(environ)
        note = "this request HAS a session: ignore_pattern did not match"
    except LookupError:
        note = "no session here: ignore_pattern skips /static/"
    start_response("200 OK", [("Content-Type", "text/css; charset=utf-8")])
    header = environ.get(DEBUG_KEY, "")
    return [f"/* {note}. X-Session-Debug: {header} */\n{CSS}".encode()]


def expose_debug_header(app: Callable) -> Callable:
    """Copy the response's ``X-Session-Debug`` header into the environ, for the page to show.

    Wraps the outside of :class:`SessionMiddleware`, which adds that header when
    the app calls ``start_response``.
    """

    def wrapper(environ: dict, start_response: Callable) -> Iterable[bytes]:
        def start(status: str, headers: list, exc_info: Any = None) -> Callable:
            environ[DEBUG_KEY] = dict(headers).get("X-Session-Debug", "")
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapper


def demo_settings(store: str, mode: str = "non-sticky", node_id: str = "n1") -> Settings:
    """The settings of a demo node (raises ConfigError for a bad store URL or mode)."""
    return Settings(
        store=store,
        mode=mode,
        node_id=node_id,
        secret_key=DEMO_SECRET_KEY,  # shared by the nodes: a cookie signed by one verifies on the other
        key_prefix=KEY_PREFIX,
        debug=True,  # X-Session-Debug on every response, a JSON line per request in the log
        ignore_pattern=r"^/(static|_demo)/",
    )


def build_app(store: str = "memory://", *, mode: str = "non-sticky", node_id: str = "n1",
              kill_button: bool = False) -> tuple[Callable, SessionMiddleware]:
    """One node's servable WSGI app, and the :class:`SessionMiddleware` inside it.

    Behind the balancer, :class:`~werkzeug.middleware.proxy_fix.ProxyFix` takes
    the client's address and scheme from ``X-Forwarded-For``/``-Proto``, as an
    app behind any proxy must: ``cookie_secure="auto"`` and the debug cookie-loss
    detector depend on them.
    """
    sessions = SessionMiddleware(DemoApp(node_id, mode, kill_button), demo_settings(store, mode, node_id))
    return ProxyFix(expose_debug_header(sessions), x_for=1, x_proto=1, x_host=1), sessions


def parse_debug_header(header: str) -> dict[str, Any]:
    """``"source=store; causes=a,b; saved=1"`` -> ``{"source": "store", "causes": ["a", "b"], "saved": True}``."""
    parts = dict(p.strip().partition("=")[::2] for p in header.split(";") if "=" in p)
    return {
        "source": parts.get("source", ""),
        "causes": [c for c in parts.get("causes", "").split(",") if c],
        "saved": parts.get("saved") == "1",
    }


# -- the page ----------------------------------------------------------------------------------

CSS = """body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; } td, th { text-align: left; padding: .25rem .75rem .25rem 0; vertical-align: top; }
code { background: #f2f2f2; padding: 0 .2rem; } .msg { background: #eef6ee; padding: .5rem; }
.node { color: #fff; padding: .2rem .6rem; border-radius: .3rem; } .n1 { background: #1f6feb; } .n2 { background: #d9480f; }
.kill { background: #fff0f0; border: 1px solid #e5a0a0; padding: .5rem; }
"""

LINKS = [
    ("/", "visit again (the counter is changed in place)"),
    ("/cart/add?item=apple", "add an apple to the cart"),
    ("/cart/add?item=pear", "add a pear to the cart"),
    ("/login?user=alice", "log in as alice (the session id rotates)"),
    ("/logout", "log out (the session is invalidated)"),
    ("/json", "the session as JSON (a read-only request: saved=0)"),
    ("/static/demo.css", "a static file (ignored: never touches the session)"),
]


def render_page(state: dict[str, Any], message: str, header: str, kill_button: bool) -> str:
    e = html.escape
    node = state["node"]
    rows = [
        ("visits", state["visits"]),
        ("cart", ", ".join(state["cart"]) or "(empty)"),
        ("user", state["user"] or "(not logged in)"),
        ("session", f"{state['sid']} (first 12 hex of the SHA-256 of the id, as in the debug log)"),
        ("is_new", state["is_new"]),
    ]
    table = "\n".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows)
    record_rows = []
    for key, value in state["record"].items():
        shown = (", ".join(map(str, value)) or "(none)") if isinstance(value, list) else value
        record_rows.append(f'<tr><th>{e(key)}</th><td id="record-{e(key)}">{e(str(shown))}</td></tr>')
    record = "\n".join(record_rows)
    links = "\n".join(f'<li><a href="{e(href)}"><code>{e(href)}</code></a> {e(text)}</li>' for href, text in LINKS)
    note = f'<p class="msg">{e(message)}</p>' if message else ""
    kill = ""
    if kill_button:
        routed = ("the node the cookie names: this one" if state["mode"] == "sticky"
                  else "round robin: the next node, not necessarily this one")
        kill = f"""<form class="kill" method="post" action="/_demo/kill">
<button type="submit">Kill the node that answers this (SIGKILL)</button>
The request goes to {e(routed)}. That node dies without saving or closing anything;
visit again and the other node serves your session. The demo restarts the dead node
after {RESTART_DELAY:g} s.</form>"""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sessionstore demo: {e(node)}</title>
<link rel="icon" href="data:,"><style>{CSS}</style></head>
<body><h1>sessionstore demo</h1>
<p>Served by node <span class="node {e(node)}" id="node">{e(node)}</span> (pid {state['pid']}),
{e(state['mode'])} mode.</p>
{note}
<table>
{table}
</table>
<h2>This request's debug record</h2>
<table>
{record}
</table>
<p><code id="x-session-debug">X-Session-Debug: {e(header)}</code> (the response header).
<code>store_ops</code> and <code>ms</code> are final when the response ends: see the node's log line.</p>
<h2>Try</h2>
<ul>
{links}
</ul>
{kill}
</body></html>
"""


def render_killed(node_id: str, pid: int) -> str:
    e = html.escape
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sessionstore demo: {e(node_id)} killed</title>
<link rel="icon" href="data:,"><style>{CSS}</style></head>
<body><h1>Node <span class="node {e(node_id)}">{e(node_id)}</span> is being killed</h1>
<p>Node {e(node_id)} (pid {pid}) answered this request and now kills itself with SIGKILL:
nothing is saved, nothing is closed. The balancer sends the next requests to the other node,
which loads your session from the store. The demo restarts {e(node_id)} after {RESTART_DELAY:g} s.</p>
<p><a href="/">Visit again</a> and see which node serves you, and the debug record.</p>
</body></html>
"""


# -- one node process ------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    """No access log: the debug log line says more."""

    def log(self, type: str, message: str, *args: Any) -> None:
        if type == "error":
            super().log(type, message, *args)


def node_main(argv: list[str] | None = None) -> int:
    """``python -m sessionstore.demo node``: serve one node until SIGTERM, SIGINT or stdin's end.

    Prints ``READY <port>`` on stdout once it listens; logs go to stderr, each
    line prefixed with the node id.
    """
    parser = argparse.ArgumentParser(prog="python -m sessionstore.demo node")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--mode", choices=MODES, default="non-sticky")
    parser.add_argument("--store", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kill-button", action="store_true")
    parser.add_argument("--watch-stdin", action="store_true",
                        help="stop when stdin ends (the demo holds the other end: its death stops the node)")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{args.node_id}] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("sessionstore.debug").setLevel(logging.INFO)

    app, sessions = build_app(args.store, mode=args.mode, node_id=args.node_id, kill_button=args.kill_button)
    server = make_server(args.host, args.port, app, threaded=True, request_handler=_QuietHandler)

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.watch_stdin:
        threading.Thread(target=_stop_at_eof, args=(stop,), daemon=True).start()
    print(f"{READY} {server.server_port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        sessions.manager.close()
    return 0


def _stop_at_eof(stop: Callable[[], None]) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    stop()


# -- the cluster: nodes + balancer -------------------------------------------------------------


class DemoError(Exception):
    """The demo could not start (a node did not come up, the port is taken)."""


@dataclass
class Node:
    """One node process."""

    node_id: str
    proc: subprocess.Popen
    port: int = 0
    log: Path | None = None
    died_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class DemoCluster:
    """Two node processes and a balancer in this process.

    ``start()`` checks the store, starts the nodes (ready when it returns) and
    the balancer; ``close()`` stops the nodes by pid (SIGTERM, then SIGKILL)
    and the balancer, and removes the temporary directory. ``node_logs``:
    ``None`` lets the nodes write on this process's stderr, else a directory
    for ``<node_id>.log`` files.
    """

    mode: str = "non-sticky"
    store: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    kill_button: bool = False
    node_logs: Path | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    balancer: Balancer | None = None
    workdir: Path | None = None
    started: list[int] = field(default_factory=list)  # every pid started, for the record

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"expected 'non-sticky' or 'sticky', got {self.mode!r}")

    # -- start -------------------------------------------------------------------

    def start(self) -> "DemoCluster":
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix="sessionstore-demo-"))
            if self.store is None:  # the embedded default store, in the demo's own folder
                self.store = f"local://{self.workdir / 'store'}"
            check_store(self.store, self.mode)
            procs = [self._spawn(node_id) for node_id in NODE_IDS]  # in parallel
            for node in procs:
                self._wait_ready(node)
            try:
                self.balancer = Balancer([(n.node_id, "127.0.0.1", n.port) for n in procs], self.mode)
                self.balancer.start(self.host, self.port)
            except OSError as exc:
                raise DemoError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                                f"(choose another --port, 0 for any free one)") from None
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, node_id: str, port: int = 0) -> Node:
        argv = [sys.executable, "-m", "sessionstore.demo", "node", "--node-id", node_id, "--mode", self.mode,
                "--store", str(self.store), "--port", str(port), "--watch-stdin"]
        if self.kill_button:
            argv.append("--kill-button")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
        if self.workdir is not None:  # sticky nodes' node copies: removed with the demo
            env["SESSIONSTORE_LOCAL_DIR"] = str(self.workdir / "local")
        log = None
        stderr: Any = None
        if self.node_logs is not None:
            log = self.node_logs / f"{node_id}.log"
            stderr = open(log, "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                    env=env, start_new_session=True)  # Ctrl-C reaches this process only
        finally:
            if stderr is not None:
                stderr.close()
        self.started.append(proc.pid)
        node = Node(node_id, proc, port, log)
        self.nodes[node_id] = node
        return node

    def _wait_ready(self, node: Node, timeout: float = 20.0) -> None:
        """Read ``READY <port>`` from the node's stdout."""
        assert node.proc.stdout is not None
        fd = node.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise DemoError(f"node {node.node_id} (pid {node.pid}) did not start within {timeout:g} s"
                                + self.log_tail(node.node_id))
            data = os.read(fd, 256)
            if not data:
                node.proc.wait(5)
                raise DemoError(f"node {node.node_id} exited with status {node.proc.returncode} while starting"
                                + self.log_tail(node.node_id))
            line += data
        word, _, port = line.decode().strip().partition(" ")
        if word != READY or not port.isdigit():
            raise DemoError(f"node {node.node_id} said {line!r}, expected '{READY} <port>'")
        node.port = int(port)

    def log_tail(self, node_id: str, lines: int = 20) -> str:
        node = self.nodes.get(node_id)
        if node is None or node.log is None or not node.log.exists():
            return ""
        tail = node.log.read_text(errors="replace").splitlines()[-lines:]
        return "".join(f"\n  [{node_id} log] {line}" for line in tail)

    # -- faults ------------------------------------------------------------------

    def kill(self, node_id: str) -> int:
        """SIGKILL the node's process (by pid) and wait for it; its exit status (``-9``)."""
        node = self.nodes[node_id]
        if node.alive:
            os.kill(node.pid, signal.SIGKILL)
        return self.wait_dead(node_id)

    def wait_dead(self, node_id: str, timeout: float = 10.0) -> int:
        node = self.nodes[node_id]
        status = node.proc.wait(timeout)
        if node.died_at is None:
            node.died_at = time.monotonic()
        return status

    def restart(self, node_id: str) -> Node:
        """Start a dead node again on its old port (the balancer knows that address)."""
        old = self.nodes[node_id]
        _close_pipes(old.proc)
        node = self._spawn(node_id, old.port)
        try:
            self._wait_ready(node)
        except DemoError:
            _stop_process(node.proc)
            raise
        return node

    # -- stop --------------------------------------------------------------------

    def close(self) -> None:
        """Stop every node (by pid) and the balancer; remove the temporary directory."""
        if self.balancer is not None:
            self.balancer.stop()
        stoppers = [threading.Thread(target=_stop_process, args=(n.proc,)) for n in self.nodes.values()]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "DemoCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stop_process(proc: subprocess.Popen) -> None:
    """Stop one child by pid: its stdin closed and SIGTERM, SIGKILL after 5 s."""
    _close_pipes(proc)
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
    proc.wait(5)


def _close_pipes(proc: subprocess.Popen) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


def check_store(url: str, mode: str) -> None:
    """Validate the settings and reach the store before starting anything; ConfigError if not.

    Creates an SQL store's tables, so that two nodes starting at once do not race to.
    """
    demo_settings(url, mode)
    from .diagnose import migrate, redact
    from .stores import open_store

    store = open_store(url)
    try:
        store.load(f"{KEY_PREFIX}demo-reachability-check")
    except StoreError as exc:
        raise ConfigError("store", f"cannot reach {redact(url)}: {exc}") from None
    finally:
        store.close()
    migrate(url, out=lambda line: None)


def _is_shared(store: str | None) -> bool:
    return store is not None and not store.lower().startswith("memory:")


MEMORY_WARNING = (
    "warning: memory:// keeps sessions inside each node's process, so the two nodes do not share them: "
    "a request that lands on the other node finds no session (debug cause unknown-id), and a killed "
    "node takes its sessions with it. That is the problem a shared store solves."
)


# -- interactive -------------------------------------------------------------------------------


def serve(host: str = "127.0.0.1", port: int = 8000, store: str | None = None, mode: str = "non-sticky",
          kill_node: bool = False, out: Callable[[str], None] | None = None) -> int:
    """Run the demo until Ctrl-C (or SIGTERM); restart a node that dies after ``RESTART_DELAY`` s."""
    write = out or (lambda line: print(line, flush=True))
    cluster = DemoCluster(mode, store, host, port, kill_node)
    previous = _interruptible()
    balancer_log = _balancer_log_to(lambda message: write(f"[balancer] {message}"))
    status = 0
    try:
        try:
            cluster.start()
        except DemoError as exc:
            print(f"sessionstore demo: {exc}", file=sys.stderr)
            status = 1
        else:
            for line in instructions(cluster):
                write(line)
            while True:
                time.sleep(0.2)
                _watch(cluster, write)
    except KeyboardInterrupt:
        pass
    finally:
        with _uninterrupted():  # a second Ctrl-C must not leave nodes behind
            cluster.close()
        _restore_signals(previous)
        logging.getLogger("sessionstore.balancer").removeHandler(balancer_log)
    if cluster.started:
        pids = ", ".join(str(pid) for pid in cluster.started)
        write(f"\nstopped: the balancer and the node processes (pids {pids})")
    return status


def _watch(cluster: DemoCluster, write: Callable[[str], None]) -> None:
    """Notice dead nodes, restart them ``RESTART_DELAY`` s later."""
    for node in list(cluster.nodes.values()):
        if node.alive:
            continue
        if node.died_at is None:
            node.died_at = time.monotonic()
            code = node.proc.returncode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            others = [n for n in NODE_IDS if n != node.node_id]
            write(f"[demo] node {node.node_id} (pid {node.pid}) {how}: the balancer sends its requests to "
                  f"{', '.join(others)}. Restarting {node.node_id} in {RESTART_DELAY:g} s.")
        elif time.monotonic() - node.died_at >= RESTART_DELAY:
            try:
                new = cluster.restart(node.node_id)
            except DemoError as exc:
                write(f"[demo] could not restart {node.node_id}: {exc}; trying again in {RESTART_DELAY:g} s")
                cluster.nodes[node.node_id].died_at = time.monotonic()
            else:
                write(f"[demo] node {new.node_id} is back: pid {new.pid}, port {new.port} "
                      f"(an empty memory: {'its sessions live on in the store' if cluster.mode == 'non-sticky' else 'sessions it owned are loaded from their backup in the store'})")


class _LineHandler(logging.Handler):
    def __init__(self, write: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(record.getMessage().removeprefix("balancer: "))
        except Exception:
            self.handleError(record)


def _balancer_log_to(write: Callable[[str], None]) -> logging.Handler:
    """Show what the balancer notices (a node down) as demo output lines."""
    handler = _LineHandler(write)
    logger = logging.getLogger("sessionstore.balancer")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.WARNING:
        logger.setLevel(logging.WARNING)
    return handler


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM meanwhile (main thread only: elsewhere signals do not arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _interruptible() -> dict[int, Any]:
    """Make Ctrl-C and SIGTERM raise KeyboardInterrupt; returns the handlers they had.

    SIGINT is set back to Python's own handler: a process started with it
    ignored (a background job of a shell without job control: ``cmd &`` in
    a script) inherits SIG_IGN, and Ctrl-C would neither stop the demo nor
    let it remove its temporary folder. Main thread only (elsewhere signals
    do not arrive).
    """
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
            signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt)}


def _restore_signals(saved: dict[int, Any]) -> None:
    """Put back the handlers :func:`_interruptible` replaced."""
    for sig, handler in saved.items():
        if handler is not None:  # None: not set from Python, nothing to put back
            signal.signal(sig, handler)


def instructions(cluster: DemoCluster) -> list[str]:
    from .diagnose import redact

    assert cluster.balancer is not None and cluster.store is not None
    url = cluster.balancer.url
    lines = [f"sessionstore demo: {cluster.mode} mode, store {redact(cluster.store)}, "
             f"secret key {DEMO_SECRET_KEY!r} (demo only: it is public)"]
    if not _is_shared(cluster.store):
        lines.append(MEMORY_WARNING)
    for node in cluster.nodes.values():
        lines.append(f"  node {node.node_id}: pid {node.pid}, http://127.0.0.1:{node.port}/")
    if cluster.mode == "sticky":
        lines += [
            f"  balancer: {url} routes by the session cookie's route: a value ending in .n1 goes to n1,",
            "  .n2 to n2; requests without one go round robin.",
            "",
            f"Open {url}",
            "",
            "Reload it: the node that created your session serves every request (its copy is the primary,",
            "the store holds a backup). Kill that node and reload: the other node takes the session over",
            "from the backup (debug cause route-changed) and reissues the cookie with its own route.",
        ]
    else:
        lines += [
            f"  balancer: {url} sends each request to the next node (round robin).",
            "",
            f"Open {url}",
            "",
            "Reload it: the page alternates between n1 and n2 and the counter keeps counting, because the",
            "session lives in the store, not in a node. Kill a node and reload: the other one carries on.",
        ]
    lines += ["", "Try:"]
    lines += [f"  {href:<24} {text}" for href, text in LINKS]
    pids = " or ".join(f"kill -9 {n.pid}" for n in cluster.nodes.values())
    if cluster.kill_button:
        lines.append(f"Failover: the page's 'Kill the node' button SIGKILLs the node that answers it (or: {pids}).")
    else:
        lines.append(f"Failover: {pids} (or start the demo with --kill-node for a button on the page).")
    lines += [
        f"A node that dies is restarted {RESTART_DELAY:g} s later.",
        "Each node logs one JSON debug line per request, prefixed with its id. Ctrl-C stops everything.",
    ]
    return lines


# -- self-test ---------------------------------------------------------------------------------


class StepFailed(Exception):
    pass


def check(condition: Any, why: str) -> None:
    if not condition:
        raise StepFailed(why)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    cookie: str | None  # the session cookie set by this reply, "" if it deletes it, None if untouched

    @property
    def debug(self) -> dict[str, Any]:
        return parse_debug_header(self.headers.get("X-Session-Debug", ""))

    @property
    def node(self) -> str | None:
        """The node that served this, as the balancer says."""
        return self.headers.get("X-Balancer-Node")

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise StepFailed(f"status {self.status}, not JSON: {self.body[:200]!r}") from None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class Browser:
    """Just enough of a browser: keeps the session cookie between requests; one User-Agent each."""

    _count = 0
    _count_lock = threading.Lock()

    def __init__(self, port: int, cookie_name: str = "session", cookie: str | None = None) -> None:
        self.port = port
        self.cookie_name = cookie_name
        self.cookie = cookie
        with Browser._count_lock:
            Browser._count += 1
            self.agent = f"sessionstore-demo-selftest/{Browser._count}"

    def get(self, path: str, as_json: bool = True) -> Reply:
        return self.request("GET", path, as_json)

    def post(self, path: str, as_json: bool = True) -> Reply:
        return self.request("POST", path, as_json, body=b"")

    def request(self, method: str, path: str, as_json: bool = True, body: bytes | None = None) -> Reply:
        headers = {"Connection": "close", "User-Agent": self.agent,
                   "Accept": "application/json" if as_json else "text/html"}
        if self.cookie is not None:
            headers["Cookie"] = f"{self.cookie_name}={self.cookie}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            reply = Reply(response.status, response.headers, response.read(), self._cookie_in(response.headers))
        finally:
            conn.close()
        if reply.cookie is not None:
            self.cookie = reply.cookie or None
        return reply

    def _cookie_in(self, headers: http.client.HTTPMessage) -> str | None:
        for header in headers.get_all("Set-Cookie") or ():
            name, _, rest = header.partition("=")
            if name.strip() == self.cookie_name:
                value, _, attributes = rest.partition(";")
                return "" if "max-age=0" in attributes.lower().replace(" ", "") else value
        return None


def _route(cookie: str | None) -> str | None:
    if not cookie or "." not in cookie:
        return None
    return cookie.rpartition(".")[2]


def _other(node_id: str) -> str:
    return next(n for n in NODE_IDS if n != node_id)


class SelfTest:
    """The walkthrough, against a running :class:`DemoCluster`. Each step starts from a fresh browser.

    ``steps()`` only needs the mode (the tests list the step names without a cluster).
    """

    def __init__(self, mode: str = "non-sticky", cluster: DemoCluster | None = None) -> None:
        self.mode = mode
        self.sticky = mode == "sticky"
        self.cluster = cluster
        self.signer = CookieSigner([DEMO_SECRET_KEY])
        self.store: Any = None
        if cluster is not None and _is_shared(cluster.store):
            from .stores import open_store

            self.store = open_store(cluster.store)  # type: ignore[arg-type]

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    @property
    def port(self) -> int:
        assert self.cluster is not None and self.cluster.balancer is not None
        return self.cluster.balancer.port

    def browser(self, cookie: str | None = None) -> Browser:
        return Browser(self.port, "session", cookie)

    def id_of(self, cookie: str | None) -> str:
        """The session id inside a signed cookie value."""
        check(cookie, "no session cookie")
        session_id = self.signer.unsign(cookie)  # type: ignore[arg-type]
        check(not isinstance(session_id, Verdict), f"cookie {cookie!r} does not verify: {session_id}")
        return session_id  # type: ignore[return-value]

    def in_store(self, session_id: str) -> bool | None:
        """Whether the shared store would load ``session_id`` (None: the store is not shared)."""
        if self.store is None:
            return None
        from .diagnose import inspect_session

        return inspect_session(self.store, session_id, key_prefix=KEY_PREFIX).usable

    def check_stored(self, session_id: str, expected: bool, why: str) -> None:
        found = self.in_store(session_id)
        if found is not None:
            check(found == expected, why)

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        counter = ("counter goes 1, 2, 3, 4 on the node the cookie names (.n1 or .n2)" if self.sticky
                   else "counter goes 1, 2, 3, 4 on alternating nodes (n1, n2, n1, n2)")
        failover = ("kill the owner node (SIGKILL): the other node takes the session over (route-changed)"
                    if self.sticky else "kill a node (SIGKILL): the session lives on on the other node")
        return [
            ("first visit creates a session", self.first_visit),
            (counter, self.counter),
            ("a read-only request saves nothing", self.read_only),
            ("cart add twice keeps 2 items (in-place change saved)", self.cart),
            ("login rotates the id; the old id loads nothing", self.login),
            ("logout invalidates: cookie deleted, counter restarts", self.logout),
            ("a forged cookie gives a fresh session", self.forged),
            ("a static path never touches the session", self.static),
            ("pages never show the session id", self.no_id_in_pages),
            ("the page shows the request's debug record", self.debug_record),
            (failover, self.failover),
        ]

    # -- steps -------------------------------------------------------------------

    def first_visit(self) -> None:
        browser = self.browser()
        reply = browser.get("/")
        check(reply.status == 200, f"status {reply.status}")
        check(reply.cookie, "no session cookie on the first visit")
        debug = reply.debug
        check(debug["source"] == "new" and "no-cookie" in debug["causes"] and debug["saved"],
              f"X-Session-Debug is {reply.headers.get('X-Session-Debug')!r}")
        state = reply.json
        check(state["node"] in NODE_IDS and state["node"] == reply.node,
              f"the page says node {state['node']!r}, the balancer says {reply.node!r}")
        if self.sticky:
            check(_route(reply.cookie) == reply.node,
                  f"the cookie's route is {_route(reply.cookie)!r}, the session was created on {reply.node}")
        else:
            check(_route(reply.cookie) is None, "a non-sticky cookie carries a route")
        self.check_stored(self.id_of(browser.cookie), True, "the new session is not in the store")

    def counter(self) -> None:
        browser = self.browser()
        nodes = []
        for expected in (1, 2, 3, 4):
            reply = browser.get("/")
            check(reply.status == 200, f"visit {expected}: status {reply.status}")
            state = reply.json
            check(state["visits"] == expected,
                  f"visit {expected} on {state['node']}: counter is {state['visits']} "
                  f"(X-Session-Debug {reply.headers.get('X-Session-Debug')!r})")
            check((reply.cookie is not None) == (expected == 1),
                  f"visit {expected}: {'no' if reply.cookie is None else 'a'} Set-Cookie")
            check(reply.debug["saved"], f"visit {expected}: not saved")
            if expected > 1:
                check(state["is_new"] is False, f"visit {expected}: is_new after the cookie came back")
                source = "local" if self.sticky else "store"
                check(reply.debug["source"] == source, f"visit {expected}: source {reply.debug['source']!r}, "
                                                       f"expected {source!r}")
            nodes.append(state["node"])
        if self.sticky:
            route = _route(browser.cookie)
            check(set(nodes) == {route}, f"served by {nodes}; the cookie names .{route}")
            other = self.browser().get("/")
            check(other.json["node"] == _other(route),  # type: ignore[arg-type]
                  f"the next new visitor went to {other.json['node']}, not the other node: "
                  f"new sessions are not spread")
        else:
            check(set(nodes) == set(NODE_IDS) and all(a != b for a, b in zip(nodes, nodes[1:])),
                  f"served by {nodes}; expected alternating nodes")

    def read_only(self) -> None:
        browser = self.browser()
        browser.get("/")
        reply = browser.get("/json")
        source = "local" if self.sticky else "store"
        check(reply.debug["source"] == source, f"source is {reply.debug['source']!r}, expected {source!r}")
        check(not reply.debug["saved"], "a request that changed nothing was saved")
        check(reply.cookie is None, "a read-only request set a cookie")
        check(reply.json["visits"] == 1, f"visits is {reply.json['visits']}")

    def cart(self) -> None:
        browser = self.browser()
        first = browser.get("/cart/add?item=apple")
        reply = browser.get("/cart/add?item=pear")
        check("mutated-in-place" in reply.debug["causes"] and reply.debug["saved"],
              f"second add: X-Session-Debug is {reply.headers.get('X-Session-Debug')!r}")
        read = browser.get("/json")
        cart = read.json["cart"]
        check(cart == ["apple", "pear"], f"cart is {cart!r}")
        nodes = [first.node, reply.node, read.node]
        if not self.sticky:
            check(set(nodes) == set(NODE_IDS), f"served by {nodes}: expected both nodes")

    def login(self) -> None:
        browser = self.browser()
        browser.get("/")
        browser.get("/cart/add?item=apple")
        old_cookie = browser.cookie
        old_id = self.id_of(old_cookie)
        reply = browser.get("/login?user=alice")
        check(reply.cookie, "login set no new cookie")
        new_id = self.id_of(reply.cookie)
        check(new_id != old_id, "the session id did not change at login")
        if self.sticky:
            check(_route(reply.cookie) == _route(old_cookie), "the route changed at login")
        self.check_stored(old_id, False, "the old id still loads a session from the store")
        self.check_stored(new_id, True, "the new id does not load the logged-in session from the store")
        state = browser.get("/json").json
        check(state["sid"] == log_id(new_id) and state["user"] == "alice", f"/json after login: {state}")
        check(state["visits"] == 1 and state["cart"] == ["apple"], f"data lost in the rotation: {state}")
        stale = self.browser(old_cookie).get("/json")
        check(stale.json["user"] is None and stale.json["is_new"] and stale.debug["source"] == "new",
              f"the pre-login cookie still works: {stale.json}, {stale.debug}")

    def logout(self) -> None:
        browser = self.browser()
        browser.get("/")
        browser.get("/")
        browser.get("/login?user=alice")
        cookie = browser.cookie
        session_id = self.id_of(cookie)
        reply = browser.get("/logout")
        check(reply.cookie == "", f"logout did not delete the cookie (Set-Cookie: {reply.headers.get('Set-Cookie')!r})")
        check("invalidated" in reply.debug["causes"], f"causes are {reply.debug['causes']}")
        self.check_stored(session_id, False, "the session is still in the store")
        browser.get("/")
        state = browser.get("/json").json
        check(state["visits"] == 1 and state["user"] is None, f"after logout and a visit: {state}")
        check(self.id_of(browser.cookie) != session_id, "the old id came back")
        stale = self.browser(cookie).get("/json")
        check(stale.json["user"] is None and stale.json["is_new"], f"a client keeping the old cookie still gets {stale.json}")
        check("invalidated" in stale.debug["causes"], f"the old cookie's causes are {stale.debug['causes']}")

    def forged(self) -> None:
        browser = self.browser()
        browser.get("/login?user=alice")
        real_id = self.id_of(browser.cookie)
        cookie: str = browser.cookie  # type: ignore[assignment]
        edited = ("B" if cookie[0] == "A" else "A") + cookie[1:]
        for how, forged in [
            ("id signed with another key", CookieSigner(["not-the-demo-key"]).sign(real_id)),
            ("id edited", edited),
            ("not a signed id at all", "garbage"),
        ]:
            mallory = self.browser(forged)
            reply = mallory.get("/json")
            state = reply.json
            check(state["user"] is None and state["is_new"] and state["sid"] != log_id(real_id),
                  f"{how}: got {state}")
            check({"bad-signature", "malformed-id"} & set(reply.debug["causes"]), f"{how}: causes {reply.debug}")
            reply = mallory.get("/")
            check(reply.cookie and self.id_of(reply.cookie) != real_id, f"{how}: no fresh cookie")
        check(browser.get("/json").json["user"] == "alice", "the real session was harmed")

    def static(self) -> None:
        browser = self.browser()
        browser.get("/")
        cookie = browser.cookie
        for who in (browser, self.browser()):
            reply = who.get("/static/demo.css")
            check(reply.status == 200, f"status {reply.status}")
            check(reply.cookie is None, "a static file set or deleted the cookie")
            check(reply.debug == {"source": "none", "causes": ["ignored"], "saved": False},
                  f"X-Session-Debug is {reply.headers.get('X-Session-Debug')!r}")
            check("no session here" in reply.text, "the app saw a session on a static path")
        state = browser.get("/json").json
        check(browser.cookie == cookie and state["visits"] == 1, f"the session changed: {state}")

    def no_id_in_pages(self) -> None:
        browser = self.browser()
        page = browser.get("/", as_json=False).text
        session_id = self.id_of(browser.cookie)
        for path, body in [("/", page), ("/json", browser.get("/json").text)]:
            check(session_id not in body, f"{path} shows the session id")
            check(log_id(session_id) in body, f"{path} does not show the id's hash")

    def debug_record(self) -> None:
        browser = self.browser()
        browser.get("/")
        browser.get("/cart/add?item=apple")
        reply = browser.get("/cart/add?item=pear", as_json=False)
        page = reply.text
        sid = log_id(self.id_of(browser.cookie))
        header = reply.headers.get("X-Session-Debug", "")
        check(header and html.escape(f"X-Session-Debug: {header}") in page,
              f"the page does not show its X-Session-Debug header {header!r}")
        check(f'id="node">{reply.node}<' in page, f"the page does not say it was served by {reply.node}")
        expected = {"node": reply.node, "sid": sid, "source": reply.debug["source"],
                    "causes": ", ".join(reply.debug["causes"]), "saved": str(reply.debug["saved"])}
        for key, value in expected.items():
            check(f'id="record-{key}">{html.escape(str(value))}<' in page,
                  f"the page's debug record does not show {key} = {value!r}")
        check('id="record-mutated">' in page, "the debug record does not name the attribute changed in place")
        record = browser.get("/json").json["record"]
        check(record.get("sid") == sid and record.get("source") == ("local" if self.sticky else "store")
              and record.get("causes") == [] and record.get("saved") is False,
              f"/json's record is {record}")

    def failover(self) -> None:
        cluster = self.cluster
        assert cluster is not None
        browser = self.browser()
        browser.get("/")
        browser.get("/cart/add?item=apple")
        reply = browser.get("/")
        check(reply.json["visits"] == 2, f"before the kill: {reply.json}")
        before = browser.cookie
        old_id = self.id_of(before)
        if cluster.kill_button:
            answer = browser.post("/_demo/kill")
            check(answer.status == 200 and answer.json.get("killed") == answer.node,
                  f"the kill button answered {answer.status} {answer.body[:200]!r}")
            victim = answer.node
            status = cluster.wait_dead(victim)  # type: ignore[arg-type]
        else:
            victim = _route(before) if self.sticky else NODE_IDS[0]
            status = cluster.kill(victim)  # type: ignore[arg-type]
        check(status == -signal.SIGKILL, f"node {victim} ended with status {status}, not by SIGKILL")
        if self.sticky:
            check(victim == _route(before), f"killed {victim}, but the session lives on {_route(before)}")
        survivor = _other(victim)  # type: ignore[arg-type]

        reply = browser.get("/")
        check(reply.status == 200, f"after the kill: status {reply.status} {reply.body[:200]!r}")
        state = reply.json
        check(state["node"] == survivor, f"after the kill, served by {state['node']}")
        check(state["visits"] == 3 and state["cart"] == ["apple"] and not state["is_new"],
              f"the session did not survive the kill: {state}, X-Session-Debug {reply.debug}")
        if self.sticky:
            check("route-changed" in reply.debug["causes"] and reply.debug["source"] == "failover",
                  f"X-Session-Debug is {reply.headers.get('X-Session-Debug')!r}, expected route-changed")
            check(reply.cookie and _route(reply.cookie) == survivor,
                  f"the cookie's route did not move to {survivor}: {reply.cookie!r}")
            new_id = self.id_of(reply.cookie)
            check(state["sid"] == log_id(new_id), "the page shows another session than the new cookie's")
            self.check_stored(old_id, False, "the old id still loads a session from the store")
            self.check_stored(new_id, True, "the session is not in the store under its new id")
        else:
            check(reply.cookie is None and state["sid"] == log_id(old_id),
                  f"the session id changed at failover ({reply.cookie!r})")
        for expected in (4, 5):
            reply = browser.get("/")
            state = reply.json
            check(state["node"] == survivor and state["visits"] == expected,
                  f"after the failover: {state}, X-Session-Debug {reply.debug}")
            check(reply.cookie is None, "the cookie changed again")
            if self.sticky:
                check(reply.debug["source"] == "local" and "route-changed" not in reply.debug["causes"],
                      f"after the failover: X-Session-Debug {reply.headers.get('X-Session-Debug')!r}")


def selftest(mode: str = "non-sticky", store: str | None = None, out: Callable[[str], None] | None = None,
             *, host: str = "127.0.0.1", port: int = 0, kill_node: bool = False) -> int:
    """Start the demo on free ports, drive it over HTTP; 0 when every step passed.

    Every process it started is stopped by pid before it returns, whatever happened.
    ConfigError (bad settings, store unreachable) propagates before anything started.
    """
    write = out or (lambda line: print(line, flush=True))
    if store is not None and not _is_shared(store):
        write(MEMORY_WARNING)
    logs = Path(tempfile.mkdtemp(prefix="sessionstore-demo-selftest-"))
    cluster = DemoCluster(mode, store, host, port, kill_node, node_logs=logs)
    previous = _interruptible()
    balancer_log = _balancer_log_to(lambda message: write(f"  [balancer] {message}"))
    steps: list[tuple[str, Callable[[], None]]] = SelfTest(mode).steps()
    failed = 0
    started = time.monotonic()
    test: SelfTest | None = None
    try:
        try:
            cluster.start()
        except DemoError as exc:
            write(f"FAIL start the demo: {exc}")
            return 1
        from .diagnose import redact

        write(f"sessionstore demo self-test: {mode} mode, store {redact(cluster.store or '')}, "
              f"balancer {cluster.balancer.url}")  # type: ignore[union-attr]
        for node in cluster.nodes.values():
            write(f"  node {node.node_id}: pid {node.pid}, port {node.port}")
        test = SelfTest(mode, cluster)
        for name, step in test.steps():
            try:
                step()
            except StepFailed as exc:
                failed += 1
                write(f"FAIL {name}: {exc}")
            except Exception as exc:  # a crash is a failed step, not a crashed self-test
                failed += 1
                write(f"FAIL {name}: {type(exc).__name__}: {exc}")
            else:
                write(f"ok   {name}")
        if failed:
            for node_id in NODE_IDS:
                tail = cluster.log_tail(node_id, 8)
                if tail:
                    write(f"last lines of node {node_id}'s log:{tail}")
    finally:
        with _uninterrupted():
            if test is not None:
                test.close()
            cluster.close()
        shutil.rmtree(logs, ignore_errors=True)
        _restore_signals(previous)
        logging.getLogger("sessionstore.balancer").removeHandler(balancer_log)
    pids = ", ".join(str(pid) for pid in cluster.started)
    write(f"{len(steps) - failed} of {len(steps)} steps passed in {time.monotonic() - started:.1f} s; "
          f"stopped the node processes (pids {pids}) and the balancer")
    return 1 if failed else 0


# -- python -m sessionstore.demo ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m sessionstore.demo node ...`` runs one node; anything else is ``sessionstore demo ...``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["node"]:
        return node_main(args[1:])
    from .cli import main as cli_main

    return cli_main(["demo", *args])


if __name__ == "__main__":
    sys.exit(main())

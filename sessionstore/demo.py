"""The demo: a small WSGI app with a session, and a self-test that drives it over HTTP.

``sessionstore demo`` serves it; ``sessionstore demo --selftest`` starts it on a
free port, walks through what a session should do with a real HTTP client, and
exits 0 when every step passed.

The app is plain WSGI: :func:`demo_app` is all a newcomer needs to read.
"""

from __future__ import annotations

import html
import http.client
import json
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from werkzeug.serving import WSGIRequestHandler, make_server

from . import SessionMiddleware, Settings, get_session
from .debug import log_id
from .signing import CookieSigner, Verdict

__all__ = ["DEMO_SECRET_KEY", "build_app", "demo_app", "selftest", "serve"]

#: Published in the source, so it protects nothing: demo only.
DEMO_SECRET_KEY = "sessionstore-demo-key-not-secret"
#: Where :func:`expose_debug_header` puts this request's ``X-Session-Debug`` value.
DEBUG_KEY = "demo.session_debug"


# -- the app ------------------------------------------------------------------------------


def demo_app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    path = environ.get("PATH_INFO") or "/"
    if path.startswith("/static/"):
        return static_file(environ, start_response)
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

    state = session_state(session)
    content_type = "application/json" if path == "/json" else "text/html; charset=utf-8"
    # The middleware saves the session here, before any header goes out, and adds
    # Set-Cookie and X-Session-Debug; so the page is rendered after this call.
    start_response("200 OK", [("Content-Type", content_type), ("Cache-Control", "no-store")])
    state["debug"] = parse_debug_header(environ.get(DEBUG_KEY, ""))
    if path == "/json":
        return [json.dumps(state).encode()]
    return [render_page(state, message).encode()]


def session_state(session: Any) -> dict[str, Any]:
    """What the pages show. Never the session id itself: only the hash the debug log uses."""
    return {
        "sid": log_id(session.id),
        "is_new": session.is_new,
        "visits": session.get("stats", {}).get("visits", 0),
        "cart": session.get("cart", {}).get("items", []),
        "user": session.get("user"),
    }


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


def build_app(store: str = "memory://") -> tuple[Callable, SessionMiddleware]:
    """The servable WSGI app, and the :class:`SessionMiddleware` inside it."""
    settings = Settings(
        store=store,
        secret_key=DEMO_SECRET_KEY,
        debug=True,  # X-Session-Debug on every response, a JSON line per request in the log
        ignore_pattern=r"^/static/",
    )
    sessions = SessionMiddleware(demo_app, settings)
    return expose_debug_header(sessions), sessions


def parse_debug_header(header: str) -> dict[str, Any]:
    """``"source=store; causes=a,b; saved=1"`` -> ``{"source": "store", "causes": ["a", "b"], "saved": True}``."""
    parts = dict(p.strip().partition("=")[::2] for p in header.split(";") if "=" in p)
    return {
        "source": parts.get("source", ""),
        "causes": [c for c in parts.get("causes", "").split(",") if c],
        "saved": parts.get("saved") == "1",
    }


# -- the page -----------------------------------------------------------------------------

CSS = """body { font-family: system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; } td, th { text-align: left; padding: .25rem .75rem .25rem 0; }
code { background: #f2f2f2; padding: 0 .2rem; } .msg { background: #eef6ee; padding: .5rem; }
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


def render_page(state: dict[str, Any], message: str) -> str:
    e = html.escape
    debug = state["debug"]
    rows = [
        ("visits", state["visits"]),
        ("cart", ", ".join(state["cart"]) or "(empty)"),
        ("user", state["user"] or "(not logged in)"),
        ("session", f"{state['sid']} (first 12 hex of the SHA-256 of the id, as in the debug log)"),
        ("is_new", state["is_new"]),
        ("debug: source", debug["source"]),
        ("debug: causes", ", ".join(debug["causes"]) or "(none)"),
        ("debug: saved", debug["saved"]),
    ]
    table = "\n".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows)
    links = "\n".join(f'<li><a href="{e(href)}"><code>{e(href)}</code></a> {e(text)}</li>' for href, text in LINKS)
    note = f'<p class="msg">{e(message)}</p>' if message else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sessionstore demo</title>
<link rel="stylesheet" href="/static/demo.css"></head>
<body><h1>sessionstore demo</h1>
{note}
<table>
{table}
</table>
<p>The <code>debug</code> rows are this request's <code>X-Session-Debug</code> response header.</p>
<h2>Try</h2>
<ul>
{links}
</ul>
</body></html>
"""


# -- serving ------------------------------------------------------------------------------


def serve(host: str = "127.0.0.1", port: int = 8000, store: str = "memory://") -> int:
    """Serve the demo until Ctrl-C."""
    app, sessions = build_app(store)
    server = make_server(host, port, app, threaded=True)
    url = f"http://{_url_host(host)}:{server.server_port}/"
    debug_log = logging.getLogger("sessionstore.debug")
    debug_log.setLevel(logging.INFO)
    debug_log.addHandler(logging.StreamHandler())
    print(f"sessionstore demo: store {store}, secret key {DEMO_SECRET_KEY!r} (demo only: it is public)")
    print(f"Open {url}")
    print("Try:")
    for href, text in LINKS:
        print(f"  {href:<24} {text}")
    print("Each request logs a JSON line on the 'sessionstore.debug' logger. Ctrl-C stops.")
    sys.stdout.flush()
    try:
        server.serve_forever()  # werkzeug's returns on Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sessions.manager.close()
    print("\nstopped")
    return 0


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


# -- self-test ----------------------------------------------------------------------------


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
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class Browser:
    """Just enough of a browser: keeps the session cookie between requests."""

    def __init__(self, port: int, cookie_name: str, cookie: str | None = None) -> None:
        self.port = port
        self.cookie_name = cookie_name
        self.cookie = cookie

    def get(self, path: str) -> Reply:
        headers = {"Connection": "close"}
        if self.cookie is not None:
            headers["Cookie"] = f"{self.cookie_name}={self.cookie}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path, headers=headers)
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


class SelfTest:
    """Steps against a running demo server. Each step starts from a fresh browser."""

    def __init__(self, port: int, sessions: SessionMiddleware) -> None:
        self.port = port
        self.manager = sessions.manager
        self.cookie_name = sessions.settings.cookie_name

    def browser(self, cookie: str | None = None) -> Browser:
        return Browser(self.port, self.cookie_name, cookie)

    def id_of(self, cookie: str | None) -> str:
        """The session id inside a signed cookie value."""
        check(cookie, "no session cookie")
        session_id = self.manager.signer.unsign(cookie)  # type: ignore[arg-type]
        check(not isinstance(session_id, Verdict), f"cookie {cookie!r} does not verify: {session_id}")
        return session_id  # type: ignore[return-value]

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("first visit sets a session cookie", self.first_visit),
            ("counter goes 1, 2, 3", self.counter),
            ("a read-only request saves nothing", self.read_only),
            ("cart add twice keeps 2 items (in-place change saved)", self.cart),
            ("login rotates the id; the old id loads nothing", self.login),
            ("logout invalidates: cookie deleted, counter restarts", self.logout),
            ("a forged cookie gives a fresh session", self.forged),
            ("a static path never touches the session", self.static),
            ("pages never show the session id", self.no_id_in_pages),
        ]

    def first_visit(self) -> None:
        browser = self.browser()
        reply = browser.get("/")
        check(reply.status == 200, f"status {reply.status}")
        check(reply.cookie, "no session cookie on the first visit")
        debug = reply.debug
        check(debug["source"] == "new" and "no-cookie" in debug["causes"] and debug["saved"],
              f"X-Session-Debug is {reply.headers.get('X-Session-Debug')!r}")
        check(self.manager.load(self.id_of(browser.cookie)) is not None, "the new session is not in the store")

    def counter(self) -> None:
        browser = self.browser()
        for expected in (1, 2, 3):
            reply = browser.get("/")
            check((reply.cookie is not None) == (expected == 1),
                  f"visit {expected}: {'no' if reply.cookie is None else 'a'} Set-Cookie")
            check(reply.debug["saved"], f"visit {expected}: not saved")
            state = browser.get("/json").json
            check(state["visits"] == expected, f"visit {expected}: counter is {state['visits']}")
            check(state["is_new"] is False, f"visit {expected}: is_new after the cookie came back")

    def read_only(self) -> None:
        browser = self.browser()
        browser.get("/")
        reply = browser.get("/json")
        check(reply.debug["source"] == "store", f"source is {reply.debug['source']!r}, expected 'store'")
        check(not reply.debug["saved"], "a request that changed nothing was saved")
        check(reply.cookie is None, "a read-only request set a cookie")

    def cart(self) -> None:
        browser = self.browser()
        browser.get("/cart/add?item=apple")
        reply = browser.get("/cart/add?item=pear")
        check("mutated-in-place" in reply.debug["causes"] and reply.debug["saved"],
              f"second add: X-Session-Debug is {reply.headers.get('X-Session-Debug')!r}")
        cart = browser.get("/json").json["cart"]
        check(cart == ["apple", "pear"], f"cart is {cart!r}")

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
        check(self.manager.load(old_id) is None, "the old id still loads a session")
        stored = self.manager.load(new_id)
        check(stored is not None and stored.get("user") == "alice", "the new id does not load the logged-in session")
        state = browser.get("/json").json
        check(state["sid"] == log_id(new_id) and state["user"] == "alice", f"/json after login: {state}")
        check(state["visits"] == 1 and state["cart"] == ["apple"], f"data lost in the rotation: {state}")
        stale = self.browser(old_cookie).get("/json")
        check(stale.json["user"] is None and stale.json["is_new"] and "unknown-id" in stale.debug["causes"],
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
        check(self.manager.load(session_id) is None, "the session is still in the store")
        browser.get("/")
        state = browser.get("/json").json
        check(state["visits"] == 1 and state["user"] is None, f"after logout and a visit: {state}")
        check(self.id_of(browser.cookie) != session_id, "the old id came back")
        stale = self.browser(cookie).get("/json").json
        check(stale["user"] is None and stale["is_new"], f"a client keeping the old cookie still gets {stale}")

    def forged(self) -> None:
        browser = self.browser()
        browser.get("/login?user=alice")
        real_id = self.id_of(browser.cookie)
        edited = ("B" if browser.cookie[0] == "A" else "A") + browser.cookie[1:]
        for how, cookie in [
            ("id signed with another key", _sign_with("not-the-demo-key", real_id)),
            ("id edited", edited),
            ("not a signed id at all", "garbage"),
        ]:
            mallory = self.browser(cookie)
            reply = mallory.get("/json")
            state = reply.json
            check(state["user"] is None and state["is_new"] and state["sid"] != log_id(real_id),
                  f"{how}: got {state}")
            check({"bad-signature", "malformed-id"} & set(reply.debug["causes"]), f"{how}: causes {reply.debug}")
            reply = mallory.get("/")
            check(reply.cookie and self.id_of(reply.cookie) != real_id, f"{how}: no fresh cookie")

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
        page = browser.get("/").text
        session_id = self.id_of(browser.cookie)
        for path, body in [("/", page), ("/json", browser.get("/json").text)]:
            check(session_id not in body, f"{path} shows the session id")
            check(log_id(session_id) in body, f"{path} does not show the id's hash")


def _sign_with(key: str, session_id: str) -> str:
    return CookieSigner([key]).sign(session_id)


class _QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        pass


def selftest(store: str = "memory://", out: Callable[[str], None] | None = None) -> int:
    """Run the demo on a free port, drive it over HTTP; 0 when every step passed."""
    write = out or (lambda line: print(line, flush=True))
    app, sessions = build_app(store)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="sessionstore-demo", daemon=True)
    thread.start()
    steps: list[tuple[str, Callable[[], None]]] = []
    failed = 0
    try:
        steps = SelfTest(server.server_port, sessions).steps()
        write(f"sessionstore demo self-test: http://127.0.0.1:{server.server_port}/, store {store}")
        for name, step in steps:
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
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        sessions.manager.close()
    write(f"{len(steps) - failed} of {len(steps)} steps passed")
    return 1 if failed else 0

"""One Flask application and one workload, served by each contender of ``peers.py``.

Every contender runs the *same* Flask views; only the session layer differs:

=========================  ===========================================================================
``sessionstore``           ``sessionstore.flask.SessionStore(app)``, non-sticky
``sessionstore-sticky``    the same, ``mode=sticky``, ``node_id=n1``, ``backup=sync``
``flask-session``          Flask-Session 0.8 (``SESSION_TYPE`` redis / memcached), its defaults
                           (``SESSION_PERMANENT=True``, Flask's ``SESSION_REFRESH_EACH_REQUEST=True``)
``flask-session-norefresh``  Flask-Session 0.8 with ``SESSION_REFRESH_EACH_REQUEST=False`` (its cheapest
                           setting: no store write on read-only requests, no sliding expiry)
``beaker``                 Beaker 1.14 ``SessionMiddleware`` around the Flask app, ``ext:redis`` /
                           ``ext:memcached``, ``timeout`` = the idle timeout (its defaults otherwise:
                           ``auto=False``, ``save_accessed_time=True``)
``bare``                   no session layer: the views work on one plain dict (the baseline)
``one-getex``              no session layer, but ``/read`` sends one ``GETEX`` of a ~2 KB value named by
                           the cookie through redis-py's client: the floor of any session layer that
                           reads its store on every request (Redis only; ``/read`` and ``/new`` only)
``sessionstore-wsgi``      the same views as a plain WSGI app in ``sessionstore.SessionMiddleware``
                           (not a peer contender: table 4 uses it to separate the Flask integration's cost)
=========================  ===========================================================================

Stores: ``redis`` (``url`` = ``redis://h:p/db``), ``memcached`` (``url`` =
``memcached://h1:p1,h2:p2,...``, the ring every contender shards over) and
``memory`` (sessionstore only).

Views (``GET``; all answer ``200`` with a short ``text/plain`` body):

``/new?kb=2``   creates the session: ``user``, ``counter``, ``cart.items`` and ~``kb`` KB of filler
                attributes (``attr0000``...: ``{"v": 100 distinct chars, "i": n}``, ~120 bytes each)
``/read``       read-only: reads one small attribute (``user``); the body is its value
``/write``      modifying: ``session["counter"] = session["counter"] + 1``
``/mutate``     in-place mutation: appends to ``session["cart"]["items"]`` (kept to its last 8
                entries) and *never* tells the session layer (no ``modified = True``)
``/untouched``  never touches the session
``/value``      read-only: ``{"counter": ..., "last_item": ..., "pid": ...}`` as JSON (verification; ``pid``
                is the worker process that answered)
``/health``     never touches the session

Each session layer is used the way its documentation says: assignments are
enough for sessionstore and Flask-Session; Beaker (``auto=False``, its
default) needs ``session.save()`` after a change, which ``/new`` and
``/write`` call — ``/mutate`` deliberately calls nothing anywhere.

``gunicorn 'apps:app_from_env()'`` (with ``--chdir benchmarks``) builds the app
named by ``BENCH_CONTENDER``, ``BENCH_STORE``, ``BENCH_URL`` (and optionally
``BENCH_SECRET``, ``BENCH_MAX_INACTIVE``, and ``BENCH_SETTINGS``: a JSON object of more
sessionstore settings, e.g. ``{"node_dir": "/dev/shm/x"}``, for the sessionstore contenders).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask import Flask, request, session as flask_session  # noqa: E402

__all__ = [
    "CONTENDERS",
    "SESSIONSTORE",
    "PEERS",
    "create_app",
    "app_from_env",
    "filler",
    "cookie_name",
    "MAX_ITEMS",
]

#: Every contender, in table order.
CONTENDERS = ("sessionstore", "sessionstore-sticky", "flask-session", "flask-session-norefresh", "beaker")
SESSIONSTORE = ("sessionstore", "sessionstore-sticky")
PEERS = ("flask-session", "flask-session-norefresh", "beaker")
LABELS = {
    "sessionstore": "sessionstore non-sticky",
    "sessionstore-sticky": "sessionstore sticky (n1, sync)",
    "flask-session": "Flask-Session 0.8",
    "flask-session-norefresh": "Flask-Session 0.8 (no refresh)",
    "beaker": "Beaker 1.14",
    "bare": "Flask, no session layer",
    "one-getex": "Flask + one GETEX, no session",
    "sessionstore-wsgi": "sessionstore WSGI (no Flask)",
}
#: Stores each contender supports here.
STORES = {
    "sessionstore": ("redis", "memcached", "memory"),
    "sessionstore-sticky": ("redis", "memcached", "memory"),
    "flask-session": ("redis", "memcached"),
    "flask-session-norefresh": ("redis", "memcached"),
    "beaker": ("redis", "memcached"),
    "bare": ("redis", "memcached", "memory"),
    "one-getex": ("redis",),
    "sessionstore-wsgi": ("redis", "memcached", "memory"),
}
#: ``/mutate`` keeps this many entries of ``cart.items`` (so the session does not grow).
MAX_ITEMS = 8
DEFAULT_SECRET = "sessionstore-peers-benchmark"
DEFAULT_MAX_INACTIVE = 1800


def cookie_name(contender: str) -> str:
    return "beaker.session.id" if contender == "beaker" else "session"


def filler(kb: float) -> dict[str, Any]:
    """~``kb`` KB of session attributes (serialized as JSON), ~120 bytes each."""
    count = max(1, round(kb * 1024 / 120))
    # distinct strings: pickle would otherwise store one shared constant once and shrink Beaker's payload
    return {f"attr{i:04d}": {"v": f"{i:05d}" * 20, "i": i} for i in range(count)}


def _memcached_hosts(url: str) -> list[tuple[str, int]]:
    netloc = urlsplit(url).netloc
    hosts = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":")
        hosts.append((host, int(port)))
    return hosts


# -- the views (identical for every contender) -------------------------------------------


def _views(app: Flask, get: Callable[[], Any], commit: Callable[[Any], None]) -> None:
    """Register the workload on ``app``; ``get()`` is the session, ``commit(s)`` the layer's "save"."""

    @app.get("/new")
    def new() -> str:
        s = get()
        s["user"] = "alice"
        s["counter"] = 0
        s["cart"] = {"items": []}
        for name, value in filler(float(request.args.get("kb", "2"))).items():
            s[name] = value
        commit(s)
        return "ok"

    @app.get("/read")
    def read() -> str:
        return str(get().get("user"))

    @app.get("/write")
    def write() -> str:
        s = get()
        s["counter"] = s["counter"] + 1
        commit(s)
        return "ok"

    @app.get("/mutate")
    def mutate() -> str:
        items = get()["cart"]["items"]
        items.append(items[-1] + 1 if items else 1)
        del items[:-MAX_ITEMS]
        return "ok"

    @app.get("/untouched")
    def untouched() -> str:
        return "ok"

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/value")
    def value() -> tuple[str, int, dict]:
        s = get()
        items = (s.get("cart") or {}).get("items") or [0]
        body = json.dumps({"counter": s.get("counter"), "last_item": items[-1], "pid": os.getpid()})
        return body, 200, {"Content-Type": "application/json"}


def _flask(secret: str | None, max_inactive: int) -> Flask:
    app = Flask("bench")
    if secret is not None:
        app.secret_key = secret
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=max_inactive)
    return app


def _nothing(s: Any) -> None:
    return None


# -- contenders ---------------------------------------------------------------------------


def create_app(contender: str, store: str, url: str, *, secret: str = DEFAULT_SECRET,
               max_inactive: int = DEFAULT_MAX_INACTIVE, **extra: Any) -> Any:
    """The benchmark app of ``contender`` on ``store`` at ``url`` (a WSGI callable).

    ``extra``: more ``SESSIONSTORE_*`` settings (lower-case field names), sessionstore only.
    The returned object has ``.bench_manager`` (sessionstore's SessionManager or None).
    """
    if store not in STORES.get(contender, ()):
        raise ValueError(f"{contender} does not run on {store!r} here")
    if contender in SESSIONSTORE:
        return _sessionstore(contender, url if store != "memory" else "memory://", secret, max_inactive, extra)
    if contender.startswith("flask-session"):
        return _flask_session(contender, store, url, secret, max_inactive)
    if contender == "beaker":
        return _beaker(store, url, secret, max_inactive)
    if contender == "sessionstore-wsgi":
        return _sessionstore_wsgi(url if store != "memory" else "memory://", secret, max_inactive, extra)
    if contender == "one-getex":
        return _one_getex(url, max_inactive)
    if contender == "bare":
        app = _flask(None, max_inactive)
        data: dict[str, Any] = {"user": "alice", "counter": 0, "cart": {"items": []}}  # one in-memory "session"
        _views(app, lambda: data, _nothing)
        app.bench_manager = None
        return app
    raise ValueError(f"unknown contender {contender!r}")


def _sessionstore(contender: str, url: str, secret: str, max_inactive: int, extra: dict) -> Flask:
    from sessionstore.flask import SessionStore

    app = _flask(secret, max_inactive)
    app.config["SESSIONSTORE_STORE"] = url
    if contender == "sessionstore-sticky":
        app.config.update(SESSIONSTORE_MODE="sticky", SESSIONSTORE_NODE_ID="n1", SESSIONSTORE_BACKUP="sync")
    for name, value in extra.items():
        app.config[f"SESSIONSTORE_{name.upper()}"] = value
    extension = SessionStore(app)
    _views(app, lambda: flask_session, _nothing)
    app.bench_manager = extension.manager_for(app)
    return app


def _sessionstore_wsgi(url: str, secret: str, max_inactive: int, extra: dict) -> Any:
    """The same views as a plain WSGI app in ``SessionMiddleware`` (isolates the Flask integration's cost)."""
    from urllib.parse import parse_qs

    from sessionstore import SessionMiddleware, get_session

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        body, kind = b"ok", "text/plain"
        if path == "/new":
            s = get_session(environ)
            s["user"] = "alice"
            s["counter"] = 0
            s["cart"] = {"items": []}
            kb = float(parse_qs(environ.get("QUERY_STRING", "")).get("kb", ["2"])[0])
            for name, value in filler(kb).items():
                s[name] = value
        elif path == "/read":
            body = str(get_session(environ).get("user")).encode()
        elif path == "/write":
            s = get_session(environ)
            s["counter"] = s["counter"] + 1
        elif path == "/mutate":
            items = get_session(environ)["cart"]["items"]
            items.append(items[-1] + 1 if items else 1)
            del items[:-MAX_ITEMS]
        elif path == "/value":
            s = get_session(environ)
            items = (s.get("cart") or {}).get("items") or [0]
            body = json.dumps({"counter": s.get("counter"), "last_item": items[-1], "pid": os.getpid()}).encode()
            kind = "application/json"
        elif path not in ("/untouched", "/health"):
            start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
            return [b""]
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]

    middleware = SessionMiddleware(app, store=url, secret_key=secret, max_inactive=max_inactive, **extra)
    middleware.bench_manager = middleware.manager
    return middleware


def _one_getex(url: str, max_inactive: int) -> Flask:
    """One ``GETEX`` per read and nothing else: what a per-request store read costs by itself."""
    import secrets

    from redis import Redis

    app = _flask(None, max_inactive)
    client = Redis.from_url(url)
    value = json.dumps({"user": "alice", "counter": 0, "cart": {"items": []}, **filler(2)}).encode()

    @app.get("/new")
    def new() -> tuple[str, int, dict]:
        key = secrets.token_urlsafe(32)
        client.set(f"one-getex:{key}", value, ex=max_inactive)
        return "ok", 200, {"Set-Cookie": f"session={key}; HttpOnly; Path=/"}

    @app.get("/read")
    def read() -> str:
        raw = client.getex(f"one-getex:{request.cookies.get('session', '')}", ex=max_inactive)
        return "alice" if raw is not None else "missing"

    app.bench_manager = None
    return app


def _flask_session(contender: str, store: str, url: str, secret: str, max_inactive: int) -> Flask:
    from flask_session import Session as FlaskSessionExtension

    app = _flask(secret, max_inactive)
    if store == "redis":
        from redis import Redis

        app.config.update(SESSION_TYPE="redis", SESSION_REDIS=Redis.from_url(url))
    else:
        from pymemcache.client.hash import HashClient

        app.config.update(SESSION_TYPE="memcached", SESSION_MEMCACHED=HashClient(_memcached_hosts(url)))
    if contender == "flask-session-norefresh":
        app.config["SESSION_REFRESH_EACH_REQUEST"] = False
    FlaskSessionExtension(app)
    _views(app, lambda: flask_session, _nothing)
    app.bench_manager = None
    return app


def _beaker(store: str, url: str, secret: str, max_inactive: int) -> Any:
    from beaker.middleware import SessionMiddleware as BeakerMiddleware

    app = _flask(None, max_inactive)  # Flask's own cookie session stays off (no secret key)
    _views(app, lambda: request.environ["beaker.session"], lambda s: s.save())
    if store == "redis":
        options = {"session.type": "ext:redis", "session.url": url}
    else:
        hosts = ";".join(f"{h}:{p}" for h, p in _memcached_hosts(url))
        options = {"session.type": "ext:memcached", "session.url": hosts}
    options.update({
        "session.timeout": max_inactive,
        "session.secret": secret,
        "session.httponly": True,
        "session.samesite": "Lax",
    })
    wrapped = BeakerMiddleware(app, options)
    wrapped.bench_manager = None
    return wrapped


def app_from_env() -> Any:
    """gunicorn entry point: ``gunicorn 'apps:app_from_env()'``."""
    contender = os.environ["BENCH_CONTENDER"]
    extra = json.loads(os.environ.get("BENCH_SETTINGS") or "{}") if contender.startswith("sessionstore") else {}
    return create_app(
        contender,
        os.environ["BENCH_STORE"],
        os.environ.get("BENCH_URL", ""),
        secret=os.environ.get("BENCH_SECRET", DEFAULT_SECRET),
        max_inactive=int(os.environ.get("BENCH_MAX_INACTIVE", DEFAULT_MAX_INACTIVE)),
        **extra,
    )

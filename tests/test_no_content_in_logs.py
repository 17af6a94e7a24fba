"""Issue 14 B: session content never reaches a log line, a debug record or a response.

A value that cannot be saved is reported by its attribute (the top-level
session key), the type of the offending object and a fixed description.
Nested keys and values are content: each scenario below hides a distinct
``SECRET-...`` marker in them, runs real requests through the middleware
(debug on) with every logger captured at DEBUG, and looks for ``SECRET``
everywhere the request left text. The same holds for a save failing while
the body streams, for the Flask integration, for stored data that fails to
decode, and for a store failure (whose driver error would list the session
key and payload).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any, Callable

import msgpack
import pytest
from flask import Flask, session

from sessionstore import CorruptPayload, SessionMiddleware, get_session
from sessionstore.flask import SessionStore
from sessionstore.payload import Meta, encode
from sessionstore.serializers import get_serializer

from .helpers import CountingMemoryStore, FakeClock, ServerClient, install_store, json_app

SERIALIZERS = ["json", "msgpack", "pickle"]
_FORMAT = logging.Formatter("%(name)s %(levelname)s %(message)s")


class Leaky:
    """A value no serializer takes, whose every text form is a secret."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __repr__(self) -> str:
        return self.secret

    __str__ = __repr__

    def __reduce__(self):  # pickle's error would quote it
        raise TypeError(f"cannot pickle {self.secret}")


def _cycle() -> dict:
    inner: list = []
    looped = {"SECRET-cycle-key": inner}
    inner.extend([looped, Leaky("SECRET-cycle-value")])
    return looped


#: name -> (attribute, value): secrets in nested keys and values, never in the attribute name.
SCENARIOS: dict[str, tuple[str, Callable[[], Any]]] = {
    "nested key over a bad value": ("profile", lambda: {"SECRET-abc123": Leaky("SECRET-value")}),
    "identifier nested key": ("cart", lambda: {"SECRET_ident": {"items": [1, Leaky("SECRET-deep")]}}),
    "tuple key": ("prefs", lambda: {("SECRET-tuple-key", 7): Leaky("SECRET-under-tuple")}),
    "bad object as a key": ("prefs", lambda: {Leaky("SECRET-key-object"): 1}),
    "bad object inside a tuple key": ("prefs", lambda: {("ok", Leaky("SECRET-in-key")): 1}),
    "set of custom objects": ("tags", lambda: {Leaky("SECRET-set-1"), Leaky("SECRET-set-2")}),
    "value whose repr is a secret": ("obj", lambda: Leaky("SECRET-repr")),
    "cycle under a secret key": ("graph", _cycle),
}


@pytest.fixture(params=SERIALIZERS)
def serializer(request) -> str:
    return request.param


def _middleware(app: Callable, serializer: str) -> SessionMiddleware:
    clock = FakeClock()
    mw = SessionMiddleware(app, clock=clock, secret_key="k", serializer=serializer, debug=True)
    install_store(mw, CountingMemoryStore(clock=clock))
    return mw


def _texts(response, caplog) -> list[str]:
    """Every text the request left: each log record in full (traceback included), the response's
    headers (X-Session-Debug among them) and its body."""
    logged = [_FORMAT.format(record) for record in caplog.records]
    headers = [f"{name}: {value}" for name, value in response.headers.items()]
    return [*logged, *headers, response.get_data(as_text=True)]


def _debug_record(caplog) -> dict:
    (line,) = [r.getMessage() for r in caplog.records if r.name == "sessionstore.debug"]
    return json.loads(line)


def _assert_no_secret(texts: list[str]) -> None:
    leaks = [text for text in texts if "SECRET" in text]
    assert not leaks, leaks


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_value_that_cannot_be_saved_leaves_no_content_anywhere(serializer, scenario, caplog):
    attribute, make_value = SCENARIOS[scenario]

    def save(session, environ):
        session["user"] = "alice"
        session[attribute] = make_value()
        return "ok"

    mw = _middleware(json_app({"/save": save}), serializer)
    with caplog.at_level(logging.DEBUG):  # the root logger: every logger propagates to it
        response = ServerClient(mw).get("/save")
    assert response.status_code == 500  # the save did fail: the check below is not vacuous
    record = _debug_record(caplog)
    assert record["causes"] == ["no-cookie", "serialization-error"] and record["attribute"] == attribute
    assert record["error"].startswith(f"session attribute {attribute!r}: ")
    assert "Leaky" in record["error"] or "builtins." in record["error"]  # the offending type is named
    assert response.headers["X-Session-Debug"] == "source=new; causes=no-cookie,serialization-error; saved=0"
    assert any(r.levelno == logging.ERROR and attribute in r.getMessage() for r in caplog.records)
    _assert_no_secret(_texts(response, caplog))


def test_a_change_made_while_streaming_leaves_no_content_in_the_log(serializer, caplog):
    """The late commit (the body already started) fails in a log line only; it holds no content."""

    def app(environ, start_response):
        session = get_session(environ)
        session["user"] = "alice"
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first "
        session["profile"] = {"SECRET-late-key": Leaky("SECRET-late-value")}
        yield b"second"

    mw = _middleware(app, serializer)
    with caplog.at_level(logging.DEBUG):
        response = ServerClient(mw).get("/")
    assert response.get_data() == b"first second"
    late = [r.getMessage() for r in caplog.records if "while streaming failed" in r.getMessage()]
    assert late and "session attribute 'profile': " in late[0]
    _assert_no_secret(_texts(response, caplog))


def test_a_corrupt_stored_record_leaves_no_content_anywhere(caplog):
    """A stored header with text where a number belongs (``corrupt-payload``): the decoding
    error's message would quote it."""

    def login(session, environ):
        session["user"] = "alice"
        return session.id

    mw = _middleware(json_app({"/login": login, "/show": lambda s, e: {"new": s.is_new}}), "json")
    client = ServerClient(mw)
    session_id = client.get("/login").json
    corrupt = encode(Meta("SECRET-header", 1.0, 60, "json"), [("user", b'"alice"', (1, 1))])  # type: ignore[arg-type]
    mw.manager.store.save(mw.manager.key(session_id), corrupt, 60)
    with caplog.at_level(logging.DEBUG):
        response = client.get("/show")
    assert response.json == {"new": True}
    record = _debug_record(caplog)
    assert record["causes"] == ["corrupt-payload"] and record["error"].startswith("bad payload header")
    _assert_no_secret(_texts(response, caplog))


class RefusesToUnpickle:
    """Pickles fine; unpickling it raises an error quoting a secret."""

    def __setstate__(self, state):
        raise ValueError("bad state SECRET-unpickled")


def _undecodable(serializer: str) -> bytes:
    """A blob of ``serializer`` whose decoding fails with an error quoting a secret."""
    if serializer == "json":
        return b'{" D": "SECRET-date"}'  # "Invalid isoformat string: 'SECRET-date'"
    if serializer == "msgpack":
        return msgpack.packb(msgpack.ExtType(5, b"SECRET-date"))  # the date extension
    thing = RefusesToUnpickle()
    thing.__dict__["x"] = 1  # a state, so that __setstate__ runs
    return get_serializer("pickle", ["k"]).dumps(thing, "thing")


def test_an_undecodable_attribute_is_reported_without_its_bytes(serializer):
    reader = get_serializer(serializer, ["k"])
    with pytest.raises(CorruptPayload) as info:
        reader.loads(_undecodable(serializer))
    assert str(info.value).endswith("attribute (ValueError)") and "SECRET" not in str(info.value)


def test_a_store_failure_quotes_no_statement_parameters(tmp_path, caplog):
    """SQLAlchemy's error text lists the statement's parameters: the session key (so the
    session id, which logs may only show hashed) and the payload. Neither may be logged."""

    def write(session, environ):
        session["note"] = "SECRET-note"
        return session.id

    url = f"sqlite:///{tmp_path}/sessions.db?timeout=0&cleanup_interval=0"  # timeout=0: fail at once
    mw = SessionMiddleware(json_app({"/write": write}), store=url, secret_key="k", debug=True)
    client = ServerClient(mw)
    random_part = client.get("/write").json.split(".")[0]
    blocker = sqlite3.connect(f"{tmp_path}/sessions.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # every write now fails: "database is locked"
    try:
        with caplog.at_level(logging.DEBUG):
            response = client.get("/write")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        mw.manager.close()
    assert response.status_code == 503
    record = _debug_record(caplog)
    assert "store-unavailable" in record["causes"] and "database is locked" in record["error"]
    texts = _texts(response, caplog)
    assert not [text for text in texts if random_part in text]
    _assert_no_secret(texts)


def test_the_flask_integration_leaves_no_content_anywhere(serializer, caplog):
    """Flask answers a failed save itself (``save_failed``), from the same error."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", SESSIONSTORE_STORE="memory://", SESSIONSTORE_DEBUG=True,
                      SESSIONSTORE_SERIALIZER=serializer)
    SessionStore(app)

    @app.get("/save")
    def save():
        session["profile"] = {"SECRET-flask-key": Leaky("SECRET-flask-value")}
        return "never sent"

    with caplog.at_level(logging.DEBUG):
        response = app.test_client().get("/save")
    assert response.status_code == 500 and response.text == "Session could not be saved.\n"
    record = _debug_record(caplog)
    assert record["attribute"] == "profile" and "serialization-error" in record["causes"]
    _assert_no_secret(_texts(response, caplog))

"""Cause codes for missing sessions (memory store; real-server versions in tests/integration)."""

from __future__ import annotations

import pytest

from sessionstore import SessionMiddleware
from sessionstore.ids import new_id

from .helpers import FakeClock, json_app
from .helpers import ServerClient as Client

HANDLERS = {
    "/login": lambda s, e: s.__setitem__("user", "alice") or s.id,
    "/read": lambda s, e: s.get("user"),
    "/logout": lambda s, e: s.invalidate(),
    "/rotate": lambda s, e: (s.rotate(), s.id)[1],
    "/bump": lambda s, e: s.__setitem__("n", s.get("n", 0) + 1),
}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def app(clock):
    return SessionMiddleware(json_app(HANDLERS), secret_key="k", debug=True, clock=clock, max_inactive=60)


def causes(response) -> list[str]:
    header = response.headers["X-Session-Debug"]
    return header.split("causes=")[1].split(";")[0].split(",")


def test_idle_timeout_is_expired(app, clock):
    client = Client(app)
    client.get("/login")
    clock.advance(61)
    assert causes(client.get("/read")) == ["expired"]


def test_session_lost_while_alive_is_evicted(app, clock):
    client = Client(app)
    sid = client.get("/login").json
    clock.advance(10)
    app.manager.store.delete(app.manager.key(sid))  # the store lost it (what an LRU eviction does)
    assert causes(client.get("/read")) == ["evicted"]


def test_invalidated(app):
    client = Client(app)
    client.get("/login")
    stale = client.get_cookie("session").value
    client.get("/logout")
    client.set_cookie("session", stale)
    assert causes(client.get("/read")) == ["invalidated"]


def test_invalidated_from_another_node_via_manager(app):
    client = Client(app)
    sid = client.get("/login").json
    assert app.manager.invalidate(sid)
    assert causes(client.get("/read")) == ["invalidated"]


def test_rotated_id_is_unknown_with_a_note(app):
    client = Client(app)
    client.get("/login")
    old = client.get_cookie("session").value
    client.get("/rotate")
    client.set_cookie("session", old)
    response = client.get("/read")
    assert causes(response) == ["unknown-id"]


def test_never_known(app):
    client = Client(app)
    client.set_cookie("session", app.manager.signer.sign(new_id()))
    assert causes(client.get("/read")) == ["unknown-id"]


def test_tombstone_refresh_is_amortised(app, clock):
    client = Client(app)
    client.get("/login")
    key = app.manager.key(client.get("/login").json) + ":t"
    first = app.manager.store.load(key).version
    for _ in range(5):
        clock.advance(1)
        client.get("/bump")
    assert app.manager.store.load(key).version == first  # not rewritten on every save
    clock.advance(20)  # past a quarter of max_inactive
    client.get("/bump")
    assert app.manager.store.load(key).version != first

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


# -- cookie-not-returned ------------------------------------------------------------------


def _loop(mw, n=3, **request):
    """A client that never stores the cookie: each request arrives without one."""
    responses = []
    for _ in range(n):
        client = Client(mw)  # a fresh cookie jar every time: the browser rejected the cookie
        responses.append(client.get("/login", **request))
    return responses


@pytest.mark.parametrize(
    "fields, request_kwargs, expected",
    [
        ({"cookie_secure": True}, {}, "Secure cookie sent over http"),
        ({"cookie_domain": "example.com"}, {"base_url": "http://other.test/"}, "Domain=example.com"),
        ({"cookie_path": "/app"}, {}, "Path=/app"),
        ({"cookie_samesite": "None"}, {}, "SameSite=None without Secure"),
        ({}, {}, "no cookie setting explains it"),
    ],
)
def test_cookie_not_returned_names_the_likely_cause(clock, fields, request_kwargs, expected, caplog):
    import json

    mw = SessionMiddleware(json_app(HANDLERS), secret_key="k", debug=True, clock=clock, **fields)
    with caplog.at_level("INFO", logger="sessionstore.debug"):
        responses = _loop(mw, **request_kwargs)
    assert "cookie-not-returned" not in causes(responses[1])
    assert "cookie-not-returned" in causes(responses[2])
    record = json.loads(caplog.records[-1].getMessage())
    assert expected in record["likely"]


def test_a_client_that_returns_its_cookie_is_not_reported(app):
    client = Client(app)
    for _ in range(5):
        response = client.get("/login")
    assert "cookie-not-returned" not in causes(response)
    for response in _loop(app, n=2):
        assert "cookie-not-returned" not in causes(response)


# -- start-up checks ----------------------------------------------------------------------


def test_startup_checks_log_each_problem_once(caplog):
    with caplog.at_level("WARNING", logger="sessionstore"):
        mw = SessionMiddleware(json_app(HANDLERS), cookie_name="__Host-sid", cookie_samesite="None",
                               store="redis://127.0.0.1:1/0?socket_connect_timeout=0.2&retries=0")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "__Host- cookie needs" in text
    assert "SameSite=None" in text
    assert "no secret_key" in text
    assert "cannot be reached" in text and "127.0.0.1:1" in text
    assert len(mw.startup_warnings) == 4


def test_clean_configuration_has_no_startup_warning(redis_server):
    mw = SessionMiddleware(json_app(HANDLERS), secret_key="k", store=redis_server.url)
    assert mw.startup_warnings == []


# -- metrics ------------------------------------------------------------------------------


def test_stats_and_prometheus(app):
    from sessionstore.metrics import prometheus_text

    client = Client(app)
    client.get("/login")
    client.get("/read")
    client.get("/bump")
    stats = app.manager.stats()
    assert stats["requests"] == 3
    assert stats["loads"] == {"new": 1, "store": 2}
    assert stats["saves"] == 2 and stats["skipped_saves"] == 1
    assert stats["causes"]["no-cookie"] == 1
    assert stats["store_ops"]["load_and_touch"]["count"] == 2
    assert stats["store_ops"]["save"]["count"] >= 2
    text = prometheus_text(stats)
    assert 'sessionstore_loads_total{source="store"} 2' in text
    assert "# TYPE sessionstore_store_op_seconds_total counter" in text

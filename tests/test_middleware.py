"""The foundation's acceptance tests: the real middleware through werkzeug's test client."""

from __future__ import annotations

import json
import logging

import pytest
from werkzeug.test import Client

from sessionstore import SessionMiddleware, Settings, get_session
from sessionstore.ids import new_id

from .helpers import CountingMemoryStore, FakeClock, install_store, json_app

SECRET = "test-secret"


def cart_add(session, environ):
    session.setdefault("cart", {"items": []})["items"].append(1)
    return session["cart"]


def cart_show(session, environ):
    return session.get("cart")


def login(session, environ):
    session["user"] = "alice"
    return session.id


def whoami(session, environ):
    return {"user": session.get("user"), "id": session.id, "new": session.is_new}


HANDLERS = {
    "/add": cart_add,
    "/show": cart_show,
    "/login": login,
    "/whoami": whoami,
    "/nothing": lambda s, e: "no session used",
    "/rotate": lambda s, e: (s.rotate(), s.id)[1],
    "/logout": lambda s, e: s.invalidate(),
    "/mark": lambda s, e: s.mark_modified(),
    "/static/x": lambda s, e: "no session" if s is None else "had a session",
}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make(clock):
    def build(**fields):
        fields.setdefault("secret_key", SECRET)
        fields.setdefault("debug", True)
        mw = SessionMiddleware(json_app(HANDLERS), clock=clock, **fields)
        store = install_store(mw, CountingMemoryStore(clock=clock))
        return mw, store, Client(mw)

    return build


def cookie_of(response) -> str | None:
    header = response.headers.get("Set-Cookie")
    return None if header is None else header.split(";")[0].split("=", 1)[1]


def debug_of(response) -> dict[str, str]:
    parts = dict(p.strip().split("=", 1) for p in response.headers["X-Session-Debug"].split(";"))
    return parts


# -- in-place mutation and write counts -----------------------------------------------------


def test_in_place_mutation_persists_and_reads_write_nothing(make):
    mw, store, client = make()
    for _ in range(5):
        client.get("/add")
    assert client.get("/show").json == {"items": [1, 1, 1, 1, 1]}
    assert store.writes == 5
    before = store.writes
    for _ in range(3):
        response = client.get("/show")
        assert debug_of(response)["saved"] == "0"
    assert store.writes == before
    assert store.calls["load_and_touch"] == 8  # one per request that sent a cookie


def test_mutation_is_reported(make, caplog):
    mw, store, client = make()
    client.get("/add")
    with caplog.at_level(logging.INFO, logger="sessionstore.debug"):
        client.get("/add").close()  # the record is emitted when the server closes the body
    record = json.loads(caplog.records[-1].getMessage())
    assert "mutated-in-place" in record["causes"] and record["mutated"] == ["cart"]


def test_untouched_session_costs_no_store_call(make):
    mw, store, client = make()
    client.get("/login")
    calls = store.total
    response = client.get("/nothing")
    assert store.total == calls
    assert debug_of(response)["source"] == "none"


def test_empty_new_session_is_not_stored_and_sets_no_cookie(make):
    mw, store, client = make()
    response = client.get("/whoami")
    assert response.json["new"] is True
    assert "Set-Cookie" not in response.headers
    assert store.writes == 0 and len(store) == 0


def test_new_session_cookie_attributes(make):
    mw, store, client = make()
    header = client.get("/login").headers["Set-Cookie"]
    assert "HttpOnly" in header and "SameSite=Lax" in header and "Path=/" in header
    assert "Secure" not in header  # auto: plain http
    https = Client(mw).get("/login", base_url="https://localhost/")
    assert "Secure" in https.headers["Set-Cookie"]


# -- bad cookies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, cause",
    [
        ("garbage", "malformed-id"),
        ("a" * 5000, "malformed-id"),
        ("../../etc/passwd", "malformed-id"),
        ("x" * 43 + ".sig", "malformed-id"),
        ("x" * 43 + "y" * 43, "bad-signature"),
        ("x" * 43 + "y" * 43 + ".n1", "bad-signature"),
        ("é" * 43, "malformed-id"),
        ("", "malformed-id"),
    ],
)
def test_bad_cookies_give_fresh_session_without_store_call(make, value, cause):
    mw, store, client = make()
    client.set_cookie("session", value)
    response = client.get("/whoami")
    assert response.json["new"] is True and response.json["user"] is None
    assert store.total == 0
    assert cause in debug_of(response)["causes"].split(",")


def test_cookie_signed_with_another_key_is_rejected(make, clock):
    mw, store, client = make()
    client.get("/login")
    other = SessionMiddleware(json_app(HANDLERS), secret_key="other", clock=clock, debug=True)
    install_store(other, store)
    c2 = Client(other)
    c2.set_cookie("session", client.get_cookie("session").value)
    loads = store.calls["load_and_touch"]
    response = c2.get("/whoami")
    assert response.json["user"] is None
    assert "bad-signature" in debug_of(response)["causes"]
    assert store.calls["load_and_touch"] == loads


def test_key_rotation_old_cookies_still_verify(make, clock):
    mw, store, client = make(secret_key="old")
    client.get("/login")
    rotated = SessionMiddleware(json_app(HANDLERS), secret_key=["new", "old"], clock=clock)
    install_store(rotated, store)
    c2 = Client(rotated)
    c2.set_cookie("session", client.get_cookie("session").value)
    assert c2.get("/whoami").json["user"] == "alice"


def test_unknown_signed_id_is_not_adopted(make):
    mw, store, client = make()
    forged_id = new_id()
    client.set_cookie("session", mw.manager.signer.sign(forged_id))
    response = client.get("/login")
    assert response.json != forged_id
    assert "unknown-id" in debug_of(response)["causes"]
    assert mw.manager.key(forged_id) not in store._entries
    assert cookie_of(response) is not None and forged_id not in cookie_of(response)


def test_unknown_id_with_empty_session_deletes_the_cookie(make):
    mw, store, client = make()
    client.set_cookie("session", mw.manager.signer.sign(new_id()))
    response = client.get("/whoami")
    assert "Max-Age=0" in response.headers["Set-Cookie"]


def test_corrupt_stored_data_gives_new_session_and_keeps_record(make):
    mw, store, client = make()
    sid = client.get("/login").json
    key = mw.manager.key(sid)
    store.save(key, b"SS1\x00\x00\x00\x05{bad}", 60)
    response = client.get("/whoami")
    assert response.json["user"] is None and response.json["id"] != sid
    assert "corrupt-payload" in debug_of(response)["causes"]
    assert store.load(key).data == b"SS1\x00\x00\x00\x05{bad}"


def test_corrupt_attribute_gives_new_session_and_keeps_record(make):
    mw, store, client = make()
    sid = client.get("/login").json
    key = mw.manager.key(sid)
    data = store.load(key).data.replace(b'"alice"', b'"alic\xff')
    store.save(key, data, 60)
    response = client.get("/whoami")
    assert response.json["user"] is None
    assert "corrupt-payload" in debug_of(response)["causes"]
    assert store.load(key).data == data


def test_corrupt_index_entry_read_with_get_gives_new_session_and_keeps_record(make):
    mw, store, client = make()
    sid = client.get("/login").json
    key = mw.manager.key(sid)
    at = store.load(key).data.index(b'\n"user"\x1f') + len(b'\n"user"\x1f')
    data = store.load(key).data
    data = data[:at] + b"x" + data[at + 1:]  # the offset is no longer a number
    store.save(key, data, 60)
    response = client.get("/whoami")  # session.get("user"): a membership test first
    assert response.json["user"] is None and response.json["id"] != sid
    assert "corrupt-payload" in debug_of(response)["causes"]
    assert store.load(key).data == data


# -- rotation, invalidation, listeners --------------------------------------------------------


def test_rotate_moves_data_and_old_id_loads_nothing(make):
    mw, store, client = make()
    old = client.get("/login").json
    response = client.get("/rotate")
    new = response.json
    assert new != old and cookie_of(response) is not None
    assert mw.manager.load(old) is None
    assert mw.manager.load(new)["user"] == "alice"
    assert client.get("/whoami").json["id"] == new


def test_invalidate_destroys_and_deletes_cookie(make):
    mw, store, client = make()
    events = []
    mw.manager.on("destroyed", events.append)
    sid = client.get("/login").json
    response = client.get("/logout")
    assert "Max-Age=0" in response.headers["Set-Cookie"]
    assert mw.manager.load(sid) is None
    assert [e.session_id for e in events] == [sid] and events[0].reason == "invalidated"
    assert client.get("/whoami").json["user"] is None


def test_invalidate_then_write_starts_new_session(make):
    def relogin(session, environ):
        session.invalidate()
        session["user"] = "bob"
        return session.id

    mw, store, client = make()
    HANDLERS["/relogin"] = relogin
    try:
        old = client.get("/login").json
        new = client.get("/relogin").json
    finally:
        del HANDLERS["/relogin"]
    assert new != old and mw.manager.load(old) is None
    assert client.get("/whoami").json == {"user": "bob", "id": new, "new": False}


def test_listeners(make):
    mw, store, client = make()
    seen = []
    for name in ("created", "destroyed", "id_changed"):
        mw.manager.on(name, lambda e: seen.append((e.name, e.session_id, e.old_id)))
    sid = client.get("/login").json
    new = client.get("/rotate").json
    client.get("/logout")
    assert seen == [("created", sid, None), ("id_changed", new, sid), ("destroyed", new, None)]


def test_listener_errors_do_not_break_requests(make):
    mw, store, client = make()
    mw.manager.on("created", lambda e: 1 / 0)
    assert client.get("/login").status_code == 200


# -- expiry ------------------------------------------------------------------------------


def test_idle_timeout(make, clock):
    mw, store, client = make(max_inactive=60)
    client.get("/login")
    clock.advance(50)
    assert client.get("/whoami").json["user"] == "alice"  # read slides the expiry
    clock.advance(50)
    assert client.get("/whoami").json["user"] == "alice"
    clock.advance(61)
    response = client.get("/whoami")
    assert response.json["user"] is None


def test_absolute_lifetime(make, clock):
    events = []
    mw, store, client = make(max_inactive=60, max_age=100)
    mw.manager.on("destroyed", events.append)
    sid = client.get("/login").json
    for _ in range(3):
        clock.advance(30)
        assert client.get("/whoami").json["user"] == "alice"
    clock.advance(15)
    response = client.get("/whoami")
    assert response.json["user"] is None
    assert "expired" in debug_of(response)["causes"]
    assert events and events[0].reason == "expired" and events[0].session_id == sid


def test_never_expires_when_max_inactive_not_positive(make, clock):
    mw, store, client = make(max_inactive=0)
    sid = client.get("/login").json
    assert store.ttl(mw.manager.key(sid)) is None
    clock.advance(10**8)
    assert client.get("/whoami").json["user"] == "alice"


def test_per_session_max_inactive(make, clock):
    def extend(session, environ):
        session.max_inactive = 600
        return session.max_inactive

    HANDLERS["/extend"] = extend
    try:
        mw, store, client = make(max_inactive=60)
        client.get("/login")
        client.get("/extend")
        clock.advance(300)
        assert client.get("/whoami").json["user"] == "alice"
        clock.advance(590)
        assert client.get("/whoami").json["user"] == "alice"
        clock.advance(601)
        assert client.get("/whoami").json["user"] is None
    finally:
        del HANDLERS["/extend"]


# -- dirty_check, ignore_pattern, errors -----------------------------------------------------


def test_dirty_check_always_saves_every_loaded_request(make):
    mw, store, client = make(dirty_check="always")
    client.get("/login")
    client.get("/whoami")
    client.get("/nothing")
    assert store.writes == 2


def test_mark_modified_forces_a_save(make):
    mw, store, client = make()
    client.get("/login")
    client.get("/mark")
    assert store.writes == 2


def test_ignore_pattern_never_loads_creates_or_saves(make):
    mw, store, client = make(ignore_pattern=r"^/static/")
    client.get("/login")
    calls = store.total

    response = client.get("/static/x")
    assert response.status_code == 200 and response.json == "no session"
    assert store.total == calls
    assert debug_of(response)["causes"] == "ignored"


def test_get_session_on_ignored_path_raises_lookup_error(clock):
    def app(environ, start_response):
        try:
            get_session(environ)
        except LookupError:
            start_response("200 OK", [])
            return [b"none"]
        start_response("500 Internal Server Error", [])
        return [b"had one"]

    client = Client(SessionMiddleware(app, ignore_pattern="^/static", secret_key=SECRET))
    assert client.get("/static/a.css").get_data() == b"none"


def test_unserializable_value_gives_500_names_attribute_and_saves_nothing(make, caplog):
    def bad(session, environ):
        session["cart"]["items"].append(object())
        return "ok"

    HANDLERS["/bad"] = bad
    try:
        mw, store, client = make()
        client.get("/add")
        writes = store.writes
        with caplog.at_level(logging.INFO):
            response = client.get("/bad")
    finally:
        del HANDLERS["/bad"]
    assert response.status_code == 500
    assert "serialization-error" in debug_of(response)["causes"]
    assert store.writes == writes
    assert any("session attribute 'cart': builtins.object is not JSON-serializable" in r.getMessage()
               for r in caplog.records)
    assert client.get("/show").json == {"items": [1]}


def test_oversized_session_is_refused_and_nothing_saved(make):
    def big(session, environ):
        session["blob"] = "x" * 5000
        return "ok"

    HANDLERS["/big"] = big
    try:
        mw, store, client = make(max_size=4096)
        client.get("/login")
        response = client.get("/big")
    finally:
        del HANDLERS["/big"]
    assert response.status_code == 500
    assert "too-large" in debug_of(response)["causes"]
    assert client.get("/whoami").json["user"] == "alice"


# -- streaming --------------------------------------------------------------------------------


def test_streamed_body_does_not_lose_the_save(clock):
    def app(environ, start_response):
        session = get_session(environ)
        session["n"] = session.get("n", 0) + 1
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            yield b"a"
            session["late"] = session.get("late", 0) + 1  # changed while streaming
            yield str(session["n"]).encode()

        return body()

    mw = SessionMiddleware(app, secret_key=SECRET, clock=clock)
    client = Client(mw)
    for expected in (b"a1", b"a2"):
        response = client.get("/")
        assert response.get_data() == expected
        response.close()  # as a WSGI server does
    sid = mw.manager.signer.unsign(client.get_cookie("session").value)
    assert dict(mw.manager.load(sid)) == {"n": 2, "late": 2}


def test_generator_app_calling_start_response_lazily(clock):
    def app(environ, start_response):
        session = get_session(environ)
        session["n"] = session.get("n", 0) + 1
        start_response("200 OK", [])
        yield str(session["n"]).encode()

    client = Client(SessionMiddleware(app, secret_key=SECRET, clock=clock))
    assert client.get("/").get_data() == b"1"
    assert client.get("/").get_data() == b"2"


def test_settings_object_and_fields(clock):
    settings = Settings(secret_key=SECRET, cookie_name="sid")
    mw = SessionMiddleware(json_app(HANDLERS), settings, clock=clock, max_inactive=5)
    assert mw.settings.cookie_name == "sid" and mw.settings.max_inactive == 5
    assert Client(mw).get("/login").headers["Set-Cookie"].startswith("sid=")


@pytest.mark.parametrize("mode", ["non-sticky", "sticky"])
def test_rotate_after_a_parallel_logout_does_not_bring_the_session_back(mode, tmp_path):
    """A request loaded the session, another logged out, then the first called rotate()."""
    import threading

    from sessionstore import SessionMiddleware, get_session
    from tests.helpers import CountingMemoryStore, ServerClient

    loaded, logged_out = threading.Event(), threading.Event()

    def app(environ, start_response):
        session = get_session(environ)
        path = environ["PATH_INFO"]
        if path == "/login":
            session["user"] = "alice"
        elif path == "/logout":
            session.invalidate()
        elif path == "/slow-rotate":
            assert session["user"] == "alice"
            loaded.set()
            assert logged_out.wait(10)
            session.rotate()
        start_response("200 OK", [])
        return [b"ok"]

    fields = {"mode": "sticky", "node_id": "n1", "node_dir": str(tmp_path / "n1")} if mode == "sticky" else {}
    mw = SessionMiddleware(app, store=CountingMemoryStore(), secret_key="rot", debug=True, **fields)
    first = ServerClient(mw)
    first.get("/login")
    cookie = first.get_cookie("session").value
    slow, results = ServerClient(mw), {}
    slow.set_cookie("session", cookie)
    thread = threading.Thread(target=lambda: results.setdefault("r", slow.get("/slow-rotate")))
    thread.start()
    assert loaded.wait(10)
    first.get("/logout")
    logged_out.set()
    thread.join(10)
    response = results["r"]
    assert "concurrent-update" in response.headers["X-Session-Debug"]
    new_cookie = slow.get_cookie("session")
    assert new_cookie is None or new_cookie.value == cookie  # no new id was handed out ...
    for value in {cookie, *(c.value for c in [slow.get_cookie("session")] if c)}:
        session_id = mw.manager.signer.unsign(value)
        assert isinstance(session_id, str) and mw.manager.load(session_id) is None  # ... nor stored
    assert all(mw.manager.load(k.removeprefix("sessionstore:{").removesuffix("}")) is None
               for k in mw.manager._shared.wrapped.keys() if "}:" not in k and k.startswith("sessionstore:{"))

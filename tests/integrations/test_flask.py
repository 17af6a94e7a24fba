"""Flask's documented session behaviours, with ``flask.session`` backed by sessionstore on a real Redis."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from uuid import uuid4

import pytest
from flask import Flask, jsonify, session

from sessionstore import ConfigError, ids
from sessionstore.flask import FlaskSession, SessionStore, settings_for
from tests.servers.process import free_port
from tests.servers.redis_fixtures import redis_commands, key_exists as exists, key_ttl as ttl

SECRET = "flask-integration-secret"


# -- the app under test ---------------------------------------------------------------


def make_app(store_url: str, **config) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY=SECRET, SESSIONSTORE_STORE=store_url,
                      SESSIONSTORE_KEY_PREFIX=f"flask-{uuid4().hex[:12]}:")
    app.config.update(config)
    SessionStore(app)
    _routes(app)
    return app


def _routes(app: Flask) -> None:
    @app.get("/set/<name>/<value>")
    def set_value(name, value):
        session[name] = value
        return "ok"

    @app.get("/show")
    def show():
        return jsonify(data=dict(session), new=session.new, modified=session.modified)

    @app.get("/read/<name>")
    def read(name):
        return str(session.get(name))

    @app.get("/untouched")
    def untouched():
        return "no session here"

    @app.get("/cart/new")
    def cart_new():
        session["cart"] = {"items": []}
        return "ok"

    @app.get("/cart/add/<int:item>")
    def cart_add(item):
        before = session.modified
        session["cart"]["items"].append(item)  # in place, no session.modified = True
        return jsonify(before=before, after=session.modified)

    @app.get("/permanent")
    def permanent():
        session.permanent = True
        session["p"] = 1
        return "ok"

    @app.get("/force")
    def force():
        session.get("anything")
        session.modified = True
        return "ok"

    @app.get("/force-only")
    def force_only():
        session.modified = True  # the session is not even loaded yet
        return "ok"

    @app.get("/clear")
    def clear():
        session.clear()
        return "ok"

    @app.get("/clear-then-flash")
    def clear_then_flash():
        session.clear()
        session["flash"] = "bye"
        return "ok"

    @app.get("/login/<user>")
    def login(user):
        session.rotate()
        session["user"] = user
        return "ok"

    @app.get("/logout")
    def logout():
        session.invalidate()
        return "ok"

    @app.get("/health")
    def health():
        try:
            session["x"] = 1
        except RuntimeError as exc:
            return f"refused: {exc}; read={session.get('x')}"
        return "stored"

    @app.get("/unserializable")
    def unserializable():
        session["bad"] = object()
        return "never sent"


@pytest.fixture
def app(redis_server) -> Flask:
    return make_app(redis_server.url)


@pytest.fixture
def client(app):
    return app.test_client()


# -- helpers --------------------------------------------------------------------------------


def set_cookies(response) -> list[dict[str, str]]:
    """The response's Set-Cookie headers as dicts: name, value, lower-case attributes."""
    cookies = []
    for header in response.headers.getlist("Set-Cookie"):
        first, *attrs = [part.strip() for part in header.split(";")]
        name, _, value = first.partition("=")
        cookie = {"name": name, "value": value}
        for attr in attrs:
            key, _, val = attr.partition("=")
            cookie[key.lower()] = val or "true"
        cookies.append(cookie)
    return cookies


def session_cookie(client, name: str = "session") -> str:
    return client.get_cookie(name).value


def manager_of(app):
    return app.extensions["sessionstore"].manager


def stored_key(app, cookie_value: str) -> str:
    manager = manager_of(app)
    session_id = manager.signer.unsign(cookie_value)
    assert isinstance(session_id, str)
    return manager.key(session_id)


# -- set / get, cookie -----------------------------------------------------------------------


def test_set_then_get_round_trips_through_redis(app, client, redis_server):
    response = client.get("/set/user/alice")
    [cookie] = set_cookies(response)
    assert cookie["name"] == "session" and cookie["httponly"] == "true" and cookie["path"] == "/"
    assert "expires" not in cookie and "max-age" not in cookie  # not permanent: a browser-session cookie
    assert "Cookie" in response.headers["Vary"]
    assert exists(redis_server, stored_key(app, cookie["value"]))

    shown = client.get("/show").get_json()
    assert shown == {"data": {"user": "alice"}, "new": False, "modified": False}


def test_first_request_session_is_new(client):
    assert client.get("/show").get_json()["new"] is True


# -- permanent -------------------------------------------------------------------------------


def test_permanent_session_cookie_expires_after_permanent_session_lifetime(redis_server):
    app = make_app(redis_server.url, PERMANENT_SESSION_LIFETIME=timedelta(hours=2))
    client = app.test_client()
    response = client.get("/permanent")
    [cookie] = set_cookies(response)
    assert cookie["max-age"] == "7200"
    expires = parsedate_to_datetime(cookie["expires"])
    assert abs((expires - datetime.now(timezone.utc)).total_seconds() - 7200) < 5
    assert 7100 < ttl(redis_server, stored_key(app, cookie["value"])) <= 7200


def test_permanent_cookie_is_refreshed_by_each_request_that_loads_the_session(redis_server):
    app = make_app(redis_server.url)
    client = app.test_client()
    client.get("/permanent")
    redis_commands(redis_server.port)
    [cookie] = set_cookies(client.get("/read/p"))
    assert cookie["value"] == session_cookie(client) and "max-age" in cookie
    assert redis_commands(redis_server.port) == ["getex"]  # refreshing the cookie costs no write
    assert set_cookies(client.get("/untouched")) == []  # untouched session: nothing to refresh


def test_permanent_cookie_is_not_refreshed_when_refresh_each_request_is_off(redis_server):
    app = make_app(redis_server.url, SESSION_REFRESH_EACH_REQUEST=False)
    client = app.test_client()
    client.get("/permanent")
    assert set_cookies(client.get("/read/p")) == []


def test_server_side_idle_timeout_defaults_to_permanent_session_lifetime(redis_server):
    app = make_app(redis_server.url, PERMANENT_SESSION_LIFETIME=900)
    client = app.test_client()
    client.get("/set/a/b")
    assert manager_of(app).settings.max_inactive == 900
    assert 800 < ttl(redis_server, stored_key(app, session_cookie(client))) <= 900


# -- modified, deep dirty detection -----------------------------------------------------------


def test_nested_mutation_is_saved_without_setting_modified(app, client, redis_server):
    client.get("/cart/new")
    redis_commands(redis_server.port)
    flags = client.get("/cart/add/7").get_json()
    assert flags == {"before": False, "after": True}
    assert redis_commands(redis_server.port) == ["getex", "evalsha"]  # loaded, then saved
    client.get("/cart/add/8")
    assert client.get("/show").get_json()["data"] == {"cart": {"items": [7, 8]}}


def test_setting_modified_true_forces_a_save(app, client, redis_server):
    client.get("/set/a/b")
    redis_commands(redis_server.port)
    client.get("/force")
    assert redis_commands(redis_server.port) == ["getex", "evalsha"]


def test_setting_modified_true_alone_loads_and_saves_the_session(app, client, redis_server):
    client.get("/set/a/b")
    redis_commands(redis_server.port)
    response = client.get("/force-only")
    assert redis_commands(redis_server.port) == ["getex", "evalsha"]
    [cookie] = set_cookies(response)  # Flask sends the cookie of a modified session again
    assert cookie["value"] == session_cookie(client)


def test_modified_true_on_an_empty_new_session_stores_nothing(client, redis_server):
    redis_commands(redis_server.port)
    response = client.get("/force")
    assert set_cookies(response) == []
    assert redis_commands(redis_server.port) == []


# -- read-only and untouched requests -------------------------------------------------------------


def test_read_only_request_writes_nothing_and_sets_no_cookie(client, redis_server):
    client.get("/set/user/alice")
    redis_commands(redis_server.port)
    response = client.get("/read/user")
    assert response.text == "alice"
    assert redis_commands(redis_server.port) == ["getex"]
    assert set_cookies(response) == []
    assert "Cookie" in response.headers["Vary"]  # session.accessed


def test_request_that_never_touches_the_session_costs_nothing(client, redis_server):
    client.get("/set/user/alice")
    redis_commands(redis_server.port)
    response = client.get("/untouched")
    assert redis_commands(redis_server.port) == []
    assert set_cookies(response) == [] and "Vary" not in response.headers


def test_empty_new_session_is_not_stored_and_sets_no_cookie(client, redis_server):
    redis_commands(redis_server.port)
    response = client.get("/read/user")
    assert response.text == "None"
    assert redis_commands(redis_server.port) == []
    assert set_cookies(response) == []


# -- clear, login, logout ---------------------------------------------------------------------------


def test_clear_deletes_the_stored_session_and_the_cookie(app, client, redis_server):
    client.get("/set/user/alice")
    old = session_cookie(client)
    response = client.get("/clear")
    [cookie] = set_cookies(response)
    assert cookie["value"] == "" and cookie["max-age"] == "0"
    assert not exists(redis_server, stored_key(app, old))
    assert client.get("/show").get_json() == {"data": {}, "new": True, "modified": False}


def test_data_written_after_clear_starts_a_new_session(app, client, redis_server):
    client.get("/set/user/alice")
    old = session_cookie(client)
    client.get("/clear-then-flash")
    new = session_cookie(client)
    assert new != old and not exists(redis_server, stored_key(app, old))
    assert client.get("/show").get_json()["data"] == {"flash": "bye"}


def test_login_rotates_the_id_and_keeps_the_data(app, client, redis_server):
    client.get("/cart/new")
    before = session_cookie(client)
    client.get("/login/alice")
    after = session_cookie(client)
    assert after != before
    assert not exists(redis_server, stored_key(app, before))
    assert exists(redis_server, stored_key(app, after))
    assert client.get("/show").get_json()["data"] == {"cart": {"items": []}, "user": "alice"}

    client.set_cookie("session", before)  # the id seen before login is worthless now
    assert client.get("/show").get_json() == {"data": {}, "new": True, "modified": False}


def test_logout_invalidates_the_session_everywhere(app, client, redis_server):
    client.get("/login/alice")
    cookie = session_cookie(client)
    response = client.get("/logout")
    [deleted] = set_cookies(response)
    assert deleted["value"] == "" and deleted["max-age"] == "0"
    assert not exists(redis_server, stored_key(app, cookie))

    client.set_cookie("session", cookie)  # replaying the old cookie
    assert client.get("/read/user").text == "None"


# -- hostile cookies --------------------------------------------------------------------------------------


def test_forged_cookie_gives_a_fresh_session_without_a_store_lookup(app, client, redis_server):
    client.get("/set/user/alice")
    genuine = session_cookie(client)
    forged = genuine[:-4] + ("AAAA" if not genuine.endswith("AAAA") else "BBBB")
    unsigned = ids.new_id() + "." + "x" * 43
    for value in (forged, unsigned, "garbage", ids.new_id()):
        client.set_cookie("session", value)
        redis_commands(redis_server.port)
        assert client.get("/show").get_json() == {"data": {}, "new": True, "modified": False}
        assert redis_commands(redis_server.port) == []  # never looked up

    client.set_cookie("session", forged)
    response = client.get("/set/user/mallory")
    [cookie] = set_cookies(response)
    assert cookie["value"] not in (forged, genuine)  # a new id is issued, the forged one is not adopted


# -- configuration ------------------------------------------------------------------------------------


def test_flask_cookie_settings_are_the_fallbacks(redis_server):
    app = make_app(
        redis_server.url,
        SESSION_COOKIE_NAME="sid", SESSION_COOKIE_PATH="/", SESSION_COOKIE_SAMESITE="strict",
        SESSION_COOKIE_HTTPONLY=True, SESSIONSTORE_COOKIE_HTTPONLY="false", PERMANENT_SESSION_LIFETIME=600,
    )
    settings = settings_for(app)
    assert (settings.cookie_name, settings.cookie_samesite, settings.cookie_httponly) == ("sid", "Strict", False)
    assert settings.max_inactive == 600 and settings.secret_keys == [SECRET]
    [cookie] = set_cookies(app.test_client().get("/set/a/b"))
    assert cookie["name"] == "sid" and cookie["samesite"] == "Strict" and "httponly" not in cookie


def test_unknown_sessionstore_key_is_a_config_error(redis_server):
    with pytest.raises(ConfigError, match="stor"):
        make_app(redis_server.url, SESSIONSTORE_STOR="redis://typo")


def test_secret_key_fallbacks_still_verify_old_cookies(redis_server):
    prefix = f"flask-{uuid4().hex[:12]}:"
    old_app = make_app(redis_server.url, SESSIONSTORE_KEY_PREFIX=prefix)
    old_client = old_app.test_client()
    old_client.get("/set/user/alice")
    cookie = session_cookie(old_client)

    new_app = make_app(redis_server.url, SESSIONSTORE_KEY_PREFIX=prefix,
                       SECRET_KEY="a-new-secret", SECRET_KEY_FALLBACKS=[SECRET])
    client = new_app.test_client()
    client.set_cookie("session", cookie)
    assert client.get("/read/user").text == "alice"
    assert manager_of(new_app).settings.secret_keys == ["a-new-secret", SECRET]


def test_ignored_path_has_a_read_only_session_and_no_store_calls(redis_server):
    app = make_app(redis_server.url, SESSIONSTORE_IGNORE_PATTERN="^/health")
    client = app.test_client()
    redis_commands(redis_server.port)
    response = client.get("/health")
    assert response.text.startswith("refused: no session on this path") and response.text.endswith("read=None")
    assert set_cookies(response) == [] and redis_commands(redis_server.port) == []


def test_debug_header(redis_server):
    app = make_app(redis_server.url, SESSIONSTORE_DEBUG="true")
    response = app.test_client().get("/set/a/b")
    assert response.headers["X-Session-Debug"] == "source=new; causes=no-cookie; saved=1"


# -- errors ----------------------------------------------------------------------------------------------


@pytest.fixture
def dead_store_app() -> Flask:
    url = f"redis://127.0.0.1:{free_port()}/0?retries=0&socket_connect_timeout=0.5&socket_timeout=0.5"
    return make_app(url)


def test_store_down_at_save_answers_503(dead_store_app):
    response = dead_store_app.test_client().get("/set/a/b")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.text == "Session store unavailable.\n"
    assert set_cookies(response) == []


def test_store_down_while_the_view_loads_the_session_answers_503(dead_store_app):
    client = dead_store_app.test_client()
    client.set_cookie("session", manager_of(dead_store_app).signer.sign(ids.new_id()))
    response = client.get("/read/user")
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"


def test_unserializable_value_answers_500_and_saves_nothing(client, redis_server):
    redis_commands(redis_server.port)
    response = client.get("/unserializable")
    assert response.status_code == 500 and response.text == "Session could not be saved.\n"
    assert set_cookies(response) == [] and redis_commands(redis_server.port) == []


# -- Flask's test helpers and types ---------------------------------------------------------------------------


def test_session_transaction_of_the_test_client(app, client):
    with client.session_transaction() as sess:
        assert isinstance(sess, FlaskSession)
        sess["user"] = "bob"
        sess["cart"] = {"items": [1]}
    with client.session_transaction() as sess:
        sess["cart"]["items"].append(2)
    assert client.get("/show").get_json()["data"] == {"user": "bob", "cart": {"items": [1, 2]}}


def test_the_underlying_session_is_in_the_environ(app):
    from flask import request

    from sessionstore import Session, get_session

    with app.test_request_context("/"):
        assert isinstance(session.store_session, Session)
        assert get_session(request.environ) is session.store_session

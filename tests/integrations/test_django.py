"""Django's documented session behaviours with ``SESSION_ENGINE = "sessionstore.django"`` on a real Redis."""

from __future__ import annotations

import sqlite3
import time
from datetime import timedelta
from uuid import uuid4

import django
import pytest
from django.conf import settings

SECRET = "django-integration-secret-" + "x" * 30
DJANGO_MIDDLEWARE = "django.contrib.sessions.middleware.SessionMiddleware"
OUR_MIDDLEWARE = "sessionstore.django.SessionMiddleware"

if not settings.configured:
    settings.configure(
        SECRET_KEY=SECRET,
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=["django.contrib.sessions"],
        DATABASES={},
        USE_TZ=True,
        SESSION_ENGINE="sessionstore.django",
        SESSIONSTORE={"store": "memory://"},
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[DJANGO_MIDDLEWARE],
    )
    django.setup()

from asgiref.sync import async_to_sync  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.test import Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from django.utils import timezone  # noqa: E402

from sessionstore import ids  # noqa: E402
from sessionstore.django import SessionStore, get_manager, settings_from_django  # noqa: E402
from tests.servers.process import free_port  # noqa: E402
from tests.servers.redis_fixtures import redis_commands, key_exists as exists, key_ttl as ttl  # noqa: E402

COOKIE = "sessionid"


# -- views and urls ---------------------------------------------------------------------------------


def set_value(request, name, value):
    request.session[name] = value
    return HttpResponse("ok")


def show(request):
    data = request.session.load()
    return JsonResponse({"data": data, "key": request.session.session_key, "modified": request.session.modified})


def read(request, name):
    return HttpResponse(str(request.session.get(name)))


def untouched(request):
    return HttpResponse("no session here")


def cart_new(request):
    request.session["cart"] = {"items": []}
    return HttpResponse("ok")


def cart_add(request, item):
    before = request.session.modified
    request.session["cart"]["items"].append(item)  # in place, no request.session.modified = True
    return JsonResponse({"before": before, "after": request.session.modified})


def login(request, user):
    request.session.cycle_key()
    request.session["user"] = user
    return HttpResponse("ok")


def logout(request):
    request.session.flush()
    return HttpResponse("ok")


def expiry(request, value):
    parsed = {"none": None, "zero": 0}.get(value)
    if value.startswith("delta"):
        parsed = timedelta(seconds=int(value[5:]))
    elif value.isdigit():
        parsed = int(value)
    request.session.set_expiry(parsed)
    return JsonResponse({"age": request.session.get_expiry_age(),
                         "browser_close": request.session.get_expire_at_browser_close()})


def destroyed_meanwhile(request):
    request.session["x"] = "mine"
    SessionStore(request.COOKIES[COOKIE]).flush()  # another request logs the session out meanwhile
    request.session["x"] = "late"
    return HttpResponse("never saved")


urlpatterns = [
    path("set/<str:name>/<str:value>", set_value),
    path("show", show),
    path("read/<str:name>", read),
    path("untouched", untouched),
    path("cart/new", cart_new),
    path("cart/add/<int:item>", cart_add),
    path("login/<str:user>", login),
    path("logout", logout),
    path("expiry/<str:value>", expiry),
    path("destroyed-meanwhile", destroyed_meanwhile),
]


# -- fixtures and helpers ---------------------------------------------------------------------------


def django_settings(store: str, middleware: str = DJANGO_MIDDLEWARE, **sessionstore) -> override_settings:
    return override_settings(
        SESSION_ENGINE="sessionstore.django",
        SESSIONSTORE={"store": store, "key_prefix": f"django-{uuid4().hex[:12]}:", **sessionstore},
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[middleware],
        SECRET_KEY=SECRET,
    )


@pytest.fixture
def client(redis_server):
    with django_settings(redis_server.url):
        get_manager()  # built now: its start-up check is a store command of its own
        yield Client()


def set_cookie(response) -> dict[str, str] | None:
    """The session cookie the response sets, as name/value/lower-case attributes, or None."""
    morsel = response.cookies.get(COOKIE)
    if morsel is None:
        return None
    cookie = {"value": morsel.value}
    cookie.update({key.lower(): str(val) for key, val in morsel.items() if val is not None and val != ""})
    return cookie


def session_cookie(client: Client) -> str:
    return client.cookies[COOKIE].value


def stored_key(cookie_value: str) -> str:
    manager = get_manager()
    session_id = manager.signer.unsign(cookie_value)
    assert isinstance(session_id, str)
    return manager.key(session_id)


# -- set / get, cookie -------------------------------------------------------------------------------


def test_set_then_get_round_trips_through_redis(client, redis_server):
    response = client.get("/set/user/alice")
    cookie = set_cookie(response)
    assert cookie["max-age"] == str(settings.SESSION_COOKIE_AGE) and cookie["httponly"]
    key = stored_key(cookie["value"])
    assert exists(redis_server, key)
    assert settings.SESSION_COOKIE_AGE - 60 < ttl(redis_server, key) <= settings.SESSION_COOKIE_AGE

    shown = client.get("/show").json()
    assert shown == {"data": {"user": "alice"}, "key": cookie["value"], "modified": False}


def test_session_key_is_the_signed_id(client):
    client.get("/set/user/alice")
    key = session_cookie(client)
    session_id = get_manager().signer.unsign(key)
    assert isinstance(session_id, str) and ids.is_valid(session_id) and key != session_id
    assert SessionStore(key).session_key == key


# -- deep dirty detection ------------------------------------------------------------------------------


def test_nested_mutation_is_saved_without_setting_modified(client, redis_server):
    client.get("/cart/new")
    redis_commands(redis_server.port)
    assert client.get("/cart/add/7").json() == {"before": False, "after": True}
    assert redis_commands(redis_server.port) == ["getex", "evalsha"]
    client.get("/cart/add/8")
    assert client.get("/show").json()["data"] == {"cart": {"items": [7, 8]}}


def test_setting_modified_true_forces_a_write(client, redis_server):
    client.get("/set/a/b")
    store = SessionStore(session_cookie(client))
    assert store.get("a") == "b"
    redis_commands(redis_server.port)
    store.modified = True
    store.save()
    assert redis_commands(redis_server.port) == ["evalsha"]
    store.save()  # nothing changed since: nothing written
    assert redis_commands(redis_server.port) == []


# -- read-only, untouched, empty ----------------------------------------------------------------------------


def test_read_only_request_writes_nothing_and_sets_no_cookie(client, redis_server):
    client.get("/set/user/alice")
    redis_commands(redis_server.port)
    response = client.get("/read/user")
    assert response.content == b"alice"
    assert redis_commands(redis_server.port) == ["getex"]
    assert set_cookie(response) is None
    assert "Cookie" in response["Vary"]


def test_request_that_never_touches_the_session_costs_nothing(client, redis_server):
    client.get("/set/user/alice")
    redis_commands(redis_server.port)
    response = client.get("/untouched")
    assert redis_commands(redis_server.port) == []
    assert set_cookie(response) is None


def test_empty_new_session_is_not_stored_and_sets_no_cookie(client, redis_server):
    redis_commands(redis_server.port)
    response = client.get("/read/user")
    assert response.content == b"None"
    assert redis_commands(redis_server.port) == []
    assert set_cookie(response) is None


def test_save_every_request_refreshes_the_cookie_without_writing(client, redis_server):
    client.get("/set/user/alice")
    with override_settings(SESSION_SAVE_EVERY_REQUEST=True):
        redis_commands(redis_server.port)
        response = client.get("/untouched")
    assert redis_commands(redis_server.port) == ["getex"]  # loaded to slide its expiry; nothing changed
    assert set_cookie(response)["value"] == session_cookie(client)


# -- cycle_key, flush -----------------------------------------------------------------------------------------


def test_cycle_key_at_login_issues_a_new_key_and_keeps_the_data(client, redis_server):
    client.get("/cart/new")
    before = session_cookie(client)
    client.get("/login/alice")
    after = session_cookie(client)
    assert after != before
    assert not exists(redis_server, stored_key(before))
    assert exists(redis_server, stored_key(after))
    assert client.get("/show").json()["data"] == {"cart": {"items": []}, "user": "alice"}

    client.cookies[COOKIE] = before  # the key seen before login is worthless now
    assert client.get("/show").json() == {"data": {}, "key": None, "modified": False}


def test_flush_at_logout_destroys_the_session_and_deletes_the_cookie(client, redis_server):
    client.get("/login/alice")
    cookie = session_cookie(client)
    response = client.get("/logout")
    deleted = set_cookie(response)
    assert deleted["value"] == "" and deleted["max-age"] == "0"
    assert not exists(redis_server, stored_key(cookie))

    client.cookies[COOKIE] = cookie  # replaying the old cookie
    assert client.get("/read/user").content == b"None"


def test_session_destroyed_by_another_request_is_not_resurrected(client, redis_server):
    client.get("/set/x/first")
    cookie = session_cookie(client)
    response = client.get("/destroyed-meanwhile")
    assert response.status_code == 400  # Django's SessionInterrupted
    assert not exists(redis_server, stored_key(cookie))


# -- hostile keys -----------------------------------------------------------------------------------------------


def test_forged_keys_are_never_looked_up_nor_adopted(client, redis_server):
    client.get("/set/user/alice")
    genuine = session_cookie(client)
    forged = genuine[:-4] + ("AAAA" if not genuine.endswith("AAAA") else "BBBB")
    for value in (forged, ids.new_id(), "garbage", ids.new_id() + "." + "x" * 43):
        redis_commands(redis_server.port)
        store = SessionStore(value)
        assert store.session_key is None
        assert store.exists(value) is False
        store.delete(value)
        client.cookies[COOKIE] = value
        assert client.get("/show").json() == {"data": {}, "key": None, "modified": False}
        assert redis_commands(redis_server.port) == []

    client.cookies[COOKIE] = forged
    issued = set_cookie(client.get("/set/user/mallory"))["value"]
    assert issued not in (forged, genuine)
    assert SessionStore(genuine).get("user") == "alice"


def test_exists_and_delete_with_a_genuine_key(client):
    client.get("/set/user/alice")
    key = session_cookie(client)
    store = SessionStore()
    assert store.exists(key) is True
    store.delete(key)
    assert store.exists(key) is False


# -- expiry -----------------------------------------------------------------------------------------------


def test_set_expiry_seconds_is_the_idle_timeout(client, redis_server):
    client.get("/set/a/b")
    response = client.get("/expiry/300")
    assert response.json() == {"age": 300, "browser_close": False}
    assert set_cookie(response)["max-age"] == "300"
    key = stored_key(session_cookie(client))
    assert 290 < ttl(redis_server, key) <= 300
    assert SessionStore(session_cookie(client)).get_expiry_age() == 300
    client.get("/read/a")  # a read slides the session's own timeout, not the default
    assert 290 < ttl(redis_server, key) <= 300


def test_set_expiry_zero_is_a_browser_session_cookie(client, redis_server):
    client.get("/set/a/b")
    response = client.get("/expiry/zero")
    assert response.json() == {"age": settings.SESSION_COOKIE_AGE, "browser_close": True}
    cookie = set_cookie(response)
    assert "max-age" not in cookie and "expires" not in cookie
    assert ttl(redis_server, stored_key(session_cookie(client))) > settings.SESSION_COOKIE_AGE - 60


def test_set_expiry_timedelta_and_none(client, redis_server):
    client.get("/set/a/b")
    age = client.get("/expiry/delta3600").json()["age"]
    assert 3590 < age <= 3600
    key = stored_key(session_cookie(client))
    assert 3590 < ttl(redis_server, key) <= 3600
    assert client.get("/expiry/none").json() == {"age": settings.SESSION_COOKIE_AGE, "browser_close": False}
    assert ttl(redis_server, key) > settings.SESSION_COOKIE_AGE - 60


def test_session_past_its_absolute_expiry_is_flushed_when_loaded(client, redis_server):
    store = SessionStore()
    store["x"] = 1
    store.set_expiry(timedelta(minutes=5))
    store.save()
    key = store.session_key
    late = SessionStore(key)  # the date passes while the store still holds the session (slid TTL)
    late.set_expiry(timezone.now() - timedelta(seconds=1))
    late.save()
    assert exists(redis_server, stored_key(key))

    assert SessionStore(key).get("x") is None
    assert not exists(redis_server, stored_key(key))


def test_clearsessions_is_a_no_op_for_redis(client, redis_server):
    client.get("/set/a/b")
    call_command("clearsessions")
    assert exists(redis_server, stored_key(session_cookie(client)))


def test_clearsessions_purges_expired_rows_of_the_sql_store(tmp_path):
    database = tmp_path / "sessions.db"
    with django_settings(f"sqlite:///{database}?cleanup_interval=0"):
        short, long = SessionStore(), SessionStore()
        short["a"], long["b"] = 1, 2
        short.set_expiry(1)
        short.save()
        long.save()
        time.sleep(1.2)
        call_command("clearsessions")
        with sqlite3.connect(database) as db:
            rows = {row[0] for row in db.execute("SELECT id FROM sessionstore_sessions")}
        assert stored_key(long.session_key) in rows
        assert stored_key(short.session_key) not in rows
        assert SessionStore(long.session_key).get("b") == 2


# -- Django's other entry points ----------------------------------------------------------------------------------


def test_create_stores_a_new_session_at_once(client):
    store = SessionStore()
    store["a"] = 1
    store.create()
    key = store.session_key
    assert key is not None and store.exists(key)
    assert SessionStore(key).load() == {"a": 1}

    empty = SessionStore()
    empty.create()
    assert empty.exists(empty.session_key) and SessionStore(empty.session_key).load() == {}


def test_test_client_session_idiom(client):
    session = client.session  # the test client stores a new (empty) session and sets its cookie
    session["user"] = "bob"
    session.save()
    assert client.get("/read/user").content == b"bob"


def test_async_accessors(client, redis_server):
    client.get("/set/user/alice")
    store = SessionStore(session_cookie(client))
    assert async_to_sync(store.aget)("user") == "alice"
    async_to_sync(store.aset_expiry)(120)
    async_to_sync(store.asave)()
    assert 110 < ttl(redis_server, stored_key(session_cookie(client))) <= 120


# -- configuration ------------------------------------------------------------------------------------------------


def test_django_settings_are_the_fallbacks(redis_server):
    with override_settings(SESSIONSTORE={"store": redis_server.url}, SESSION_COOKIE_AGE=600,
                           SECRET_KEY_FALLBACKS=["older-secret"], SESSION_COOKIE_SAMESITE="Strict"):
        config = settings_from_django()
    assert config.max_inactive == 600 and config.secret_keys == [SECRET, "older-secret"]
    assert (config.cookie_name, config.cookie_samesite) == ("sessionid", "Strict")


@pytest.mark.parametrize("sessionstore", [{"stor": "memory://"}, {"cookie_name": "sid"}])
def test_bad_sessionstore_setting_is_improperly_configured(sessionstore):
    with override_settings(SESSIONSTORE=sessionstore):
        with pytest.raises(ImproperlyConfigured):
            settings_from_django()


# -- sessionstore's middleware ------------------------------------------------------------------------------------


def test_our_middleware_gives_the_lock_policy_the_path_and_frees_the_lock(redis_server):
    with django_settings(redis_server.url, OUR_MIDDLEWARE, locking="uri:^/read/"):
        client = Client()
        client.get("/set/user/alice")
        key = stored_key(session_cookie(client))
        client.get("/read/user")  # the first use of each script also loads it (SCRIPT LOAD)
        redis_commands(redis_server.port)
        assert client.get("/read/user").content == b"alice"
        assert redis_commands(redis_server.port) == ["evalsha", "evalsha"]  # lock+load, unlock
        assert not exists(redis_server, key + ":lock")
        redis_commands(redis_server.port)
        client.get("/untouched")
        assert redis_commands(redis_server.port) == []


def test_our_middleware_answers_503_when_the_store_is_down():
    dead = f"redis://127.0.0.1:{free_port()}/0?retries=0&socket_connect_timeout=0.5&socket_timeout=0.5"
    with django_settings(dead, OUR_MIDDLEWARE):
        client = Client()
        response = client.get("/set/a/b")  # fails saving
        assert response.status_code == 503 and response["Retry-After"] == "1"
        client.cookies[COOKIE] = get_manager().signer.sign(ids.new_id())
        response = client.get("/read/a")  # fails loading
        assert response.status_code == 503 and response["Retry-After"] == "1"

"""Locking modes on the memory store, through the middleware (real stores: tests/integration)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from sessionstore import ConfigError, SessionMiddleware, get_session
from sessionstore.locking import AUTO_READ_ONLY_AFTER, LockPolicy
from sessionstore.stores.memory import MemoryStore

from .helpers import ServerClient as Client

SECRET = "lock-secret"


def incrementing_app(environ, start_response):
    session = get_session(environ)
    path = environ["PATH_INFO"]
    if path == "/slow":
        session.get("n")  # loads (and locks) first, then works a while
        time.sleep(float(environ.get("QUERY_STRING") or 0.3))
    if path != "/read":
        n = session.get("n", 0)
        time.sleep(0.001)  # widen the read-modify-write window
        session["n"] = n + 1
    else:
        session.get("n")
    start_response("200 OK", [])
    return [b"ok"]


def _run_parallel(mw, cookie, path, workers=8, each=50):
    codes: list[int] = []

    def worker():
        client = Client(mw)
        client.set_cookie("session", cookie)
        for _ in range(each):
            codes.append(client.get(path).status_code)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def _new_session(mw) -> str:
    client = Client(mw)
    client.get("/inc")
    return client.get_cookie("session").value


def _count(mw, cookie) -> int:
    return mw.manager.load(mw.manager.signer.unsign(cookie))["n"]


def test_locking_all_makes_same_attribute_increments_exact():
    mw = SessionMiddleware(incrementing_app, secret_key=SECRET, locking="all", lock_timeout=10)
    cookie = _new_session(mw)
    codes = _run_parallel(mw, cookie, "/inc")
    assert set(codes) == {200}
    assert _count(mw, cookie) == 1 + 8 * 50


def test_without_locking_same_attribute_increments_are_lost_and_reported(caplog):
    mw = SessionMiddleware(incrementing_app, secret_key=SECRET, debug=True)
    cookie = _new_session(mw)
    with caplog.at_level("INFO", logger="sessionstore.debug"):
        _run_parallel(mw, cookie, "/inc")
    lost = 1 + 8 * 50 - _count(mw, cookie)
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sessionstore.debug"]
    conflicts = [r for r in records if "concurrent-update" in r["causes"] and r.get("conflicts") == ["n"]]
    assert lost > 0
    # every lost increment is accounted for by a concurrent-update record naming "n"
    assert sum(r["overwritten"]["n"] for r in conflicts) == lost


def test_lock_timeout_gives_503_and_cause():
    mw = SessionMiddleware(incrementing_app, secret_key=SECRET, locking="all", lock_timeout=0.1, debug=True)
    cookie = _new_session(mw)
    slow = threading.Thread(target=lambda: _run_parallel(mw, cookie, "/slow", workers=1, each=1))
    slow.start()
    time.sleep(0.05)
    client = Client(mw)
    client.set_cookie("session", cookie)
    response = client.get("/inc")
    slow.join()
    assert response.status_code == 503
    assert "lock-timeout" in response.headers["X-Session-Debug"]
    assert response.headers["Retry-After"] == "1"


def test_uri_locking_only_matching_paths():
    policy = LockPolicy("uri:^/cart")
    assert policy.should_lock("/cart/add") and not policy.should_lock("/home")


def test_auto_stops_locking_read_only_paths_and_locks_again_on_write():
    policy = LockPolicy("auto")
    assert policy.should_lock("/page")
    for _ in range(AUTO_READ_ONLY_AFTER):
        policy.observe("/page", modified=False)
    assert not policy.should_lock("/page")
    policy.observe("/page", modified=True)
    assert policy.should_lock("/page")


def test_auto_learns_through_the_middleware():
    store = MemoryStore()
    mw = SessionMiddleware(incrementing_app, secret_key=SECRET, locking="auto", store=store)
    cookie = _new_session(mw)
    client = Client(mw)
    client.set_cookie("session", cookie)
    for _ in range(AUTO_READ_ONLY_AFTER):
        client.get("/read")
    assert not mw.manager.lock_policy.should_lock("/read")
    assert mw.manager.lock_policy.should_lock("/inc")


def test_long_request_keeps_its_lock_by_renewal():
    mw = SessionMiddleware(incrementing_app, secret_key=SECRET, locking="all", lock_expiry=0.3, lock_timeout=3)
    cookie = _new_session(mw)
    results = []
    environ_qs = "1.0"  # longer than lock_expiry: only renewal keeps the lock

    def slow_request():
        client = Client(mw)
        client.set_cookie("session", cookie)
        results.append(client.get("/slow", query_string=environ_qs).status_code)

    slow = threading.Thread(target=slow_request)
    slow.start()
    time.sleep(0.5)  # past lock_expiry: without renewal the next request would get in now
    started = time.monotonic()
    client = Client(mw)
    client.set_cookie("session", cookie)
    assert client.get("/inc").status_code == 200
    waited = time.monotonic() - started
    slow.join()
    assert results == [200] and waited > 0.3
    assert _count(mw, cookie) == 3


def test_locking_needs_a_locking_store():
    class Plain:
        def load(self, key): ...
        def load_and_touch(self, key, ttl): ...
        def save(self, key, data, ttl, expect=None): ...
        def touch(self, key, ttl): ...
        def delete(self, key, expect=None): ...
        def close(self): ...

    with pytest.raises(ConfigError, match="locking"):
        SessionMiddleware(incrementing_app, secret_key=SECRET, locking="all", store=Plain())

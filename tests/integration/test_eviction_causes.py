"""`evicted` reproduced for real: the store drops a live session under memory pressure.

The tombstone (small, longer-lived) survives the session, so the debug record
can tell that the session was lost while it should have been alive.
"""

from __future__ import annotations

import json
import os

import pymemcache
import redis

from sessionstore import SessionMiddleware, get_session
from tests.helpers import ServerClient as Client
from tests.servers.process import ServerProcess, free_port, require_binary
from tests.servers.redis_fixtures import start_redis


def _app(environ, start_response):
    session = get_session(environ)
    if environ["PATH_INFO"] == "/login":
        session["user"] = "alice"
        session["profile"] = "x" * 1500  # a session of ~1.6 KB
    body = json.dumps({"user": session.get("user")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def _causes(response) -> list[str]:
    return response.headers["X-Session-Debug"].split("causes=")[1].split(";")[0].split(",")


def test_memcached_lru_eviction_is_reported_as_evicted(tmp_path):
    server = ServerProcess(
        [require_binary("memcached"), "-l", "127.0.0.1", "-p", str(port := free_port()), "-U", "0",
         "-m", "4", "-u", "root"], port, tmp_path).start()
    try:
        mw = SessionMiddleware(_app, store=f"memcached://127.0.0.1:{port}", secret_key="k", debug=True)
        client = Client(mw)
        client.get("/login")
        assert client.get("/read").json == {"user": "alice"}
        raw = pymemcache.Client(("127.0.0.1", port), timeout=2, connect_timeout=2)
        store = mw.manager.store
        session_key = mw.manager.key(mw.manager.signer.unsign(client.get_cookie("session").value))
        filler = os.urandom(1600)  # same slab class as the session: LRU evicts the session first
        for written in range(8_000):  # ~12 MB through a 4 MB cache, without touching the session
            raw.set(f"filler-{written}", filler, noreply=False)
        assert store.load(session_key) is None, "memcached never evicted the session"
        assert int(raw.stats()[b"evictions"]) > 0
        assert store.load(session_key + ":t") is not None  # the small tombstone lives in another slab
        response = client.get("/read")
        assert response.json == {"user": None}
        assert _causes(response) == ["evicted"]
    finally:
        server.stop()


def test_redis_maxmemory_eviction_is_reported_as_evicted(tmp_path):
    # volatile-ttl evicts the keys closest to expiry first: sessions before their tombstones
    server = start_redis(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "volatile-ttl")
    try:
        mw = SessionMiddleware(_app, store=f"redis://127.0.0.1:{server.port}/0", secret_key="k",
                               debug=True, max_inactive=600)
        client = Client(mw)
        client.get("/login")
        session_key = mw.manager.key(mw.manager.signer.unsign(client.get_cookie("session").value))
        raw = redis.Redis(port=server.port)
        filler = os.urandom(1600)
        written = 0
        while raw.exists(session_key) and written < 20_000:
            raw.set(f"filler-{written}", filler, ex=3600)
            written += 1
        assert not raw.exists(session_key), "Redis never evicted the session"
        assert int(raw.info("stats")["evicted_keys"]) > 0
        assert raw.exists(session_key + ":t")
        response = client.get("/read")
        assert response.json == {"user": None}
        assert _causes(response) == ["evicted"]
    finally:
        server.stop()


def test_local_store_lru_eviction_is_reported_as_evicted(tmp_path):
    """local:// bounded to 20 sessions: the 21st login evicts the least recently used one."""
    mw = SessionMiddleware(_app, store=f"local://{tmp_path / 'local'}?max_sessions=20", secret_key="k", debug=True)
    first = Client(mw)
    first.get("/login")
    for _ in range(25):
        Client(mw).get("/login")
    response = first.get("/")
    assert json.loads(response.get_data())["user"] is None
    assert _causes(response) == ["evicted"]

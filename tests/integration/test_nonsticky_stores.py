"""Non-sticky mode through the real middleware against real Redis, Redis Cluster and memcached.

Every count here is read on the servers (Redis slowlog, memcached ``stats``),
not from the store's own bookkeeping; faults are real (SIGKILL, SIGSTOP).
"""

from __future__ import annotations

import json
import os
import signal
import time

from sessionstore import SessionMiddleware
from sessionstore.stores.base import companion_key
from tests.helpers import FakeClock, ServerClient, json_app
from tests.servers.memcached_fixtures import memcached_peek
from tests.servers.redis_fixtures import redis_client, start_redis

from .conftest import SECRET, DebugLog, RealStore

PRIMARY_COPY, BACKUP_COPY = 1, 2  # memcached client flags of the copies (sessionstore/stores/memcached.py)

HANDLERS = {
    "/login": lambda s, e: s.update(user="ann", cart={"items": []}, n=int(e.get("QUERY_STRING") or 0)),
    "/add": lambda s, e: s["cart"]["items"].append(1),  # in place, never assigned
    "/read": lambda s, e: {"items": len(s["cart"]["items"]), "n": s["n"]},
    "/inc": lambda s, e: s.__setitem__("n", s["n"] + 1),
    "/peek": lambda s, e: s.get("user"),  # loads (a new session when there is no cookie)
    "/remember": lambda s, e: setattr(s, "max_inactive", 7200),  # its own idle timeout ("remember me")
    "/nothing": lambda s, e: "never touches the session",
    "/static/logo": lambda s, e: "ignored path",
}


def middleware(url: str, **fields) -> SessionMiddleware:
    """The real middleware on ``url``, debug records on."""
    return SessionMiddleware(json_app(HANDLERS), store=url, secret_key=SECRET, debug=True,
                             ignore_pattern="^/static/", **fields)


def debug_header(response) -> dict[str, str]:
    """``X-Session-Debug: source=…; causes=a,b; saved=0|1`` as a dict."""
    return dict(part.split("=", 1) for part in response.headers["X-Session-Debug"].split("; "))


def causes(response) -> list[str]:
    return [c for c in debug_header(response)["causes"].split(",") if c]


def logged_in(mw: SessionMiddleware, n: int = 0) -> ServerClient:
    """A client holding a new stored session (``/login``)."""
    client = ServerClient(mw)
    assert client.get("/login", query_string=str(n)).status_code == 200
    assert client.get_cookie("session") is not None
    return client


def session_key(mw: SessionMiddleware, client: ServerClient) -> str:
    return mw.manager.key(mw.manager.signer.unsign(client.get_cookie("session").value))


# -- 1. cost model and in-place changes ------------------------------------------------------


def test_costs_and_in_place_changes_on_real_stores(any_store: RealStore, debug_log: DebugLog):
    """Server-side command counts per kind of request match the contract's cost model.

    Tombstones: creating a session also writes its ``<key>:t`` tombstone (one
    more save: 1 command on Redis, 2 on memcached — primary and backup copy),
    and a save refreshes it only once a quarter of ``max_inactive`` has passed
    since the last refresh (asserted at the end). Read-only requests never write it.
    """
    redis = any_store.kind != "memcached"
    create, modify, tombstone = (2, 2, 1) if redis else (4, 3, 2)
    clock = FakeClock(time.time())
    mw = middleware(any_store.url, clock=clock)
    for _ in range(3):  # warm-up: Redis loads its scripts (on every Cluster primary) once
        logged_in(mw).get("/add")

    def cost(client: ServerClient, path: str, expected: int, saved: bool | None = None):
        before = any_store.commands()
        response = client.get(path)
        spent = any_store.commands() - before
        assert response.status_code == 200, path
        assert spent == expected, f"{path}: {spent} commands on the servers, expected {expected}"
        assert debug_log.records[-1]["store_ops"] == spent  # the debug record tells the truth
        if saved is not None:
            assert debug_header(response)["saved"] == str(int(saved)), path
        return response

    client = ServerClient(mw)
    cost(client, "/login", create, saved=True)  # new session + its tombstone
    key = session_key(mw, client)
    for _ in range(5):
        response = cost(client, "/add", modify, saved=True)
        assert "mutated-in-place" in causes(response)
        assert debug_log.records[-1]["mutated"] == ["cart"]
    assert cost(client, "/read", 1, saved=False).json == {"items": 5, "n": 0}
    assert "Set-Cookie" not in cost(client, "/nothing", 0).headers
    assert causes(cost(client, "/static/logo", 0)) == ["ignored"]
    stranger = ServerClient(mw)
    empty = cost(stranger, "/peek", 0, saved=False)
    assert "Set-Cookie" not in empty.headers and stranger.get_cookie("session") is None

    stone = mw.manager.store.load(companion_key(key, "t"))
    assert json.loads(stone.data)["s"] == "alive"
    clock.advance(mw.settings.max_inactive / 4)
    cost(client, "/read", 1, saved=False)  # a read never refreshes the tombstone
    cost(client, "/add", modify + tombstone, saved=True)  # due: this save refreshes it
    cost(client, "/add", modify, saved=True)  # refreshed: not again for max_inactive / 4
    assert json.loads(mw.manager.store.load(companion_key(key, "t")).data)["w"] == round(clock(), 3)
    assert client.get("/read").json == {"items": 7, "n": 0}
    mw.manager.close()


def test_a_session_with_its_own_idle_timeout_reads_in_one_command(any_store: RealStore, debug_log: DebugLog):
    """A per-session ``max_inactive`` (Django's set_expiry, "remember me") is slid by a read in its one
    command once the node has seen it; a node seeing it for the first time pays one more, once."""
    node_a, node_b = middleware(any_store.url), middleware(any_store.url)
    client = logged_in(node_a)
    assert client.get("/remember").status_code == 200  # saved on node A with max_inactive 7200

    def read_cost(on: ServerClient) -> int:
        before = any_store.commands()
        assert on.get("/read").json == {"items": 0, "n": 0}
        return any_store.commands() - before

    assert read_cost(client) == 1
    elsewhere = ServerClient(node_b)
    elsewhere.set_cookie("session", client.get_cookie("session").value)
    touch = 2 if any_store.kind == "memcached" else 1  # memcached touches both copies
    assert [read_cost(elsewhere) for _ in range(3)] == [1 + touch, 1, 1]  # slid by the default, then fixed
    if any_store.kind == "redis":
        with redis_client(any_store.ports[0]) as redis:
            assert 7100 < redis.ttl(session_key(node_a, client)) <= 7200
    node_a.manager.close()
    node_b.manager.close()


# -- 2. Redis stopped, then back --------------------------------------------------------------


def _assert_unavailable(client: ServerClient, path: str) -> None:
    started = time.monotonic()
    response = client.get(path)
    assert response.status_code == 503, path
    assert "store-unavailable" in causes(response) and debug_header(response)["saved"] == "0"
    assert response.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 5, "a down store must fail the request promptly"


def test_redis_killed_answers_503_then_restarted_serves_intact_sessions(tmp_path, debug_log: DebugLog):
    """SIGKILL Redis (AOF, fsync always) → 503 store-unavailable; restart on the same port → all back."""
    server = start_redis(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    try:
        mw = middleware(f"redis://127.0.0.1:{server.port}/0?retries=1&socket_timeout=0.5")
        clients = [logged_in(mw, n) for n in range(10)]
        server.kill()
        for client in clients:
            _assert_unavailable(client, "/inc")
            _assert_unavailable(client, "/read")
        _assert_unavailable(ServerClient(mw), "/login")  # a new session cannot be stored either
        assert clients[0].get("/nothing").status_code == 200  # the store is not needed here
        server.start()
        for n, client in enumerate(clients):
            assert client.get("/read").json == {"items": 0, "n": n}  # the failed increments left no trace
            assert client.get("/inc").status_code == 200
            assert client.get("/read").json == {"items": 0, "n": n + 1}
        assert not [r for r in debug_log.records if {"corrupt-payload", "unknown-id", "evicted"} & set(r["causes"])]
        mw.manager.close()
    finally:
        server.stop()


def test_redis_frozen_answers_503_then_thawed_serves_intact_sessions(tmp_path, debug_log: DebugLog):
    """SIGSTOP (an unreachable server: timeouts, not refusals) → 503; SIGCONT → requests recover."""
    server = start_redis(tmp_path)
    try:
        mw = middleware(f"redis://127.0.0.1:{server.port}/0?retries=0&socket_timeout=0.3")
        clients = [logged_in(mw, n) for n in range(5)]
        os.kill(server.pid, signal.SIGSTOP)
        try:
            for client in clients:
                _assert_unavailable(client, "/inc")
        finally:
            os.kill(server.pid, signal.SIGCONT)
        for n, client in enumerate(clients):
            assert client.get("/read").json == {"items": 0, "n": n}
            assert client.get("/inc").status_code == 200
            assert client.get("/read").json == {"items": 0, "n": n + 1}
        mw.manager.close()
    finally:
        server.stop()


# -- 3. memcached node killed mid-run -------------------------------------------------------------


def _primary_port(cluster, key: str) -> int:
    (port,) = [s.port for s in cluster.ring if (item := memcached_peek(s.port, key)) and item[1] == PRIMARY_COPY]
    return port


def _read_all(clients, relocated: set[int], n=lambda i: i, before=lambda i: None) -> None:
    """Read every session (``before(i)`` first): intact; exactly those in ``relocated`` say
    ``relocated`` and are re-saved (``saved=1``) by that read."""
    for i, client in enumerate(clients):
        before(i)
        response = client.get("/read")
        assert response.status_code == 200 and response.json == {"items": 0, "n": n(i)}, i
        assert ("relocated" in causes(response)) == (i in relocated), i
        assert debug_header(response)["saved"] == str(int(i in relocated)), i


def test_memcached_node_killed_mid_run_relocates_each_session_once(memcached_fault_cluster):
    cluster = memcached_fault_cluster
    mw = middleware(cluster.url())
    clients = [logged_in(mw, n) for n in range(100)]
    primaries = [_primary_port(cluster, session_key(mw, c)) for c in clients]
    victim = cluster.ring[1]
    orphaned = {i for i, port in enumerate(primaries) if port == victim.port}
    assert 10 < len(orphaned) < 70, len(orphaned)

    kill_half_way = lambda i: victim.kill() if i == 50 else None  # noqa: E731
    _read_all(clients, {i for i in orphaned if i >= 50}, before=kill_half_way)
    _read_all(clients, {i for i in orphaned if i < 50})  # read before the kill: moved now
    _read_all(clients, set())  # every one was re-saved: relocated once only
    for client in clients:
        assert client.get("/inc").status_code == 200
    _read_all(clients, set(), n=lambda i: i + 1)
    for i in orphaned:  # a primary and a backup copy again, both on live nodes
        key = session_key(mw, clients[i])
        flags = sorted(item[1] for s in cluster.ring if s is not victim and (item := memcached_peek(s.port, key)))
        assert flags == [PRIMARY_COPY, BACKUP_COPY], i
    mw.manager.close()


# -- 4. Sentinel failover ---------------------------------------------------------------------------


def test_sentinel_failover_keeps_sessions_saved_through_the_middleware(redis_sentinel, debug_log: DebugLog):
    """Sessions saved before the master's ``kill -9`` are read after the failover; the first
    request after the kill rides the failover out on the store's retries (no 503)."""
    mw = middleware(redis_sentinel.url + "?retries=40&retry_backoff=0.5")
    clients = [logged_in(mw, n) for n in range(20)]
    old = redis_sentinel.master_port()
    with redis_client(old) as client:  # replication is asynchronous: wait for it
        assert client.wait(1, 5000) == 1
    redis_sentinel.nodes[old].kill()
    try:
        started = time.monotonic()
        assert clients[0].get("/read").json == {"items": 0, "n": 0}
        ridden_out = time.monotonic() - started
        for n, client in enumerate(clients):
            assert client.get("/read").json == {"items": 0, "n": n}
            assert client.get("/inc").status_code == 200
            assert client.get("/read").json == {"items": 0, "n": n + 1}
        assert redis_sentinel.master_port() != old
        # nothing lost, nothing unavailable (20 new cookies to one address: cookie-not-returned)
        assert {c for r in debug_log.records for c in r["causes"]} <= {"no-cookie", "cookie-not-returned"}
        print(f"first request after the kill took {ridden_out:.2f}s")
    finally:
        mw.manager.close()
        redis_sentinel.restore(old)

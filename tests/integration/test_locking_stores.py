"""Session locking and parallel requests against real Redis and real memcached.

Parallel requests are threads, each with its own client carrying the shared
cookie, calling the real middleware. Server-side evidence comes from the
Redis slowlog (commands a script runs are logged with client ``?:0``, so a
lock taken inside a script is still seen) and memcached ``stats``.
"""

from __future__ import annotations

import http.client
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
from pymemcache.client.base import Client

from sessionstore import SessionMiddleware, get_session
from sessionstore.ids import new_id
from sessionstore.locking import AUTO_READ_ONLY_AFTER
from sessionstore.stores import ANY, open_store
from sessionstore.stores.base import companion_key
from tests.helpers import ServerClient
from tests.servers.memcached_fixtures import memcached_command_count, memcached_peek
from tests.servers.redis_fixtures import redis_client, redis_commands, wait_until

from . import app_server
from .conftest import SECRET, DebugLog, RealStore

WORKERS, EACH = 8, 200


def counter_app(environ: dict, start_response):
    """``/inc/<name>`` increments ``session[name]``; ``/page?write`` writes; anything else only reads."""
    session = get_session(environ)
    path = environ["PATH_INFO"]
    if path == "/login":
        session.update(user="ann", n=0)
    elif path.startswith("/inc/"):
        name = path[len("/inc/"):]
        value = session.get(name, 0)
        time.sleep(0.0005)  # widen the read-modify-write window
        session[name] = value + 1
    elif environ.get("QUERY_STRING") == "write":
        session["writes"] = session.get("writes", 0) + 1
    else:
        session.get("n")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def middleware(url: str, app=counter_app, **fields) -> SessionMiddleware:
    fields.setdefault("lock_timeout", 30)  # 2 shared cores: never let a slow moment fail a request
    return SessionMiddleware(app, store=url, secret_key=SECRET, debug=True, **fields)


def login(mw: SessionMiddleware) -> tuple[ServerClient, str]:
    """A client with a new stored session (``n = 0``) and its cookie value."""
    client = ServerClient(mw)
    assert client.get("/login").status_code == 200
    return client, client.get_cookie("session").value


def client_for(mw: SessionMiddleware, cookie: str) -> ServerClient:
    client = ServerClient(mw)
    client.set_cookie("session", cookie)
    return client


def stored(mw: SessionMiddleware, cookie: str) -> dict:
    """The session as stored now (``manager.load`` reads the store)."""
    return dict(mw.manager.load(mw.manager.signer.unsign(cookie)))


def hammer(mw: SessionMiddleware, cookie: str, paths: list[str]) -> tuple[list[int], float]:
    """One thread per path, each sending ``EACH`` requests to it; (status codes, seconds)."""
    codes: list[int] = []
    start = threading.Barrier(len(paths))

    def worker(path: str) -> None:
        client = client_for(mw, cookie)
        start.wait()
        codes.extend(client.get(path).status_code for _ in range(EACH))

    threads = [threading.Thread(target=worker, args=(path,)) for path in paths]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes, time.monotonic() - began


def assert_all_ok(codes: list[int], log: DebugLog) -> None:
    """Every request answered 200; otherwise name why the others failed."""
    failed = [r for r in log.records if "store-unavailable" in r["causes"] or "lock-timeout" in r["causes"]]
    why = sorted({r.get("error", "") for r in failed})
    assert codes == [200] * len(codes), f"{len(codes) - codes.count(200)} requests failed: {why}"


def debug_header(response) -> str:
    return response.headers["X-Session-Debug"]


# -- 5. parallel requests: the acceptance ----------------------------------------------------


def test_own_attributes_merge_exactly_without_locking(locking_store: RealStore, debug_log: DebugLog):
    """8 workers x 200 requests, each incrementing its own attribute of one session: all exact."""
    mw = middleware(locking_store.url, locking="none")
    _, cookie = login(mw)
    codes, seconds = hammer(mw, cookie, [f"/inc/c{w}" for w in range(WORKERS)])
    assert len(codes) == WORKERS * EACH
    assert_all_ok(codes, debug_log)
    assert stored(mw, cookie) == {"user": "ann", "n": 0, **{f"c{w}": EACH for w in range(WORKERS)}}
    merged = debug_log.naming("concurrent-update")
    assert merged, "the requests never overlapped: the merge was not exercised"
    assert not [r for r in merged if r.get("conflicts")]
    print(f"{locking_store.kind}: {WORKERS}x{EACH} own-attribute requests in {seconds:.1f}s, {len(merged)} merged")
    mw.manager.close()


def test_same_attribute_is_exact_with_locking_all(locking_store: RealStore, debug_log: DebugLog):
    mw = middleware(locking_store.url, locking="all")
    _, cookie = login(mw)
    codes, seconds = hammer(mw, cookie, ["/inc/n"] * WORKERS)
    assert len(codes) == WORKERS * EACH
    assert_all_ok(codes, debug_log)
    assert stored(mw, cookie)["n"] == WORKERS * EACH
    assert not debug_log.naming("concurrent-update")  # the lock serialized every save
    waited = [r for r in debug_log.records if r.get("lock_wait_ms")]
    assert waited, "the requests never overlapped: the lock was not exercised"
    print(f"{locking_store.kind}: {WORKERS}x{EACH} locked requests in {seconds:.1f}s, {len(waited)} waited")
    mw.manager.close()


def test_same_attribute_lost_updates_are_exactly_reported_without_locking(
    locking_store: RealStore, debug_log: DebugLog
):
    """Lost increments = sum of ``overwritten["n"]`` over the concurrent-update records naming ``n``."""
    mw = middleware(locking_store.url, locking="none")
    _, cookie = login(mw)
    codes, seconds = hammer(mw, cookie, ["/inc/n"] * WORKERS)
    assert len(codes) == WORKERS * EACH
    assert_all_ok(codes, debug_log)
    lost = WORKERS * EACH - stored(mw, cookie)["n"]
    naming_n = [r for r in debug_log.naming("concurrent-update") if "n" in r.get("conflicts", [])]
    assert lost > 0, "no increment was lost: the requests never overlapped"
    assert sum(r["overwritten"]["n"] for r in naming_n) == lost
    print(f"{locking_store.kind}: {WORKERS}x{EACH} unlocked requests in {seconds:.1f}s, {lost} lost, "
          f"{len(naming_n)} conflict records")
    mw.manager.close()


# -- 6. a lock holder killed mid-request; stale owners --------------------------------------------------


def lock_holder(store: RealStore, key: str) -> bytes | None:
    """The token in the session's lock, read on the servers (None: no lock)."""
    lock = companion_key(key, "lock")
    if store.kind == "memcached":
        found = [item[0] for port in store.ports if (item := memcached_peek(port, lock))]
        assert len(found) <= 1, "a lock lives on one node"
        return found[0] if found else None
    with redis_client(store.ports[0]) as client:
        return client.get(lock)


def lock_ttl(store: RealStore, key: str) -> float | None:
    """Seconds the lock has left, read on the servers (memcached: whole seconds); None: no lock."""
    lock = companion_key(key, "lock")
    if store.kind == "memcached":
        for port in store.ports:
            client = Client(("127.0.0.1", port), timeout=2)
            try:
                line = client.raw_command(f"mg {lock} t".encode())
            finally:
                client.close()
            if line.startswith(b"HD"):
                return float(line.split(b" t")[1])
        return None
    with redis_client(store.ports[0]) as client:
        ms = client.pttl(lock)
    return None if ms < 0 else ms / 1000


def _hold_in_background(port: int, cookie: str) -> list[BaseException | int]:
    """``GET /hold?60`` on the app server from a thread; the outcome lands in the list returned."""
    outcome: list[BaseException | int] = []

    def run() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            connection.request("GET", "/hold?60", headers={"Cookie": f"session={cookie}"})
            outcome.append(connection.getresponse().status)
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)
        finally:
            connection.close()

    threading.Thread(target=run, daemon=True).start()
    return outcome


def _busy(probe: SessionMiddleware, cookie: str) -> bool:
    """Whether the session lock is held (a request that will not wait gets 503 lock-timeout)."""
    response = client_for(probe, cookie).get("/inc")
    assert response.status_code in (200, 503)
    assert (response.status_code == 503) == ("lock-timeout" in debug_header(response))
    return response.status_code == 503


def test_killed_lock_holder_blocks_the_session_until_its_lock_expires(
    locking_store: RealStore, tmp_path, debug_log: DebugLog
):
    """A request holding the lock in another process is SIGKILLed: the session stays locked
    until the lock expires (no renewal any more), then another middleware instance proceeds.
    While the holder lived, renewal kept the lock for longer than ``lock_expiry``."""
    # memcached counts expiry in whole seconds of its own clock: a 1 s lock lives (0, 1] s there
    # and is lost between renewals (reported as a store limitation), so it gets 2 s.
    expiry = 2.0 if locking_store.kind == "memcached" else 1.0
    mw = middleware(locking_store.url, app_server.app, locking="all", lock_expiry=expiry, lock_timeout=10)
    probe = middleware(locking_store.url, app_server.app, locking="all", lock_expiry=expiry, lock_timeout=0)
    client = ServerClient(mw)
    assert client.get("/inc").status_code == 200  # a new session, n = 1
    cookie = client.get_cookie("session").value
    key = mw.manager.key(mw.manager.signer.unsign(cookie))
    server = app_server.start_app_server(tmp_path, locking_store.url, SECRET, expiry)
    try:
        outcome = _hold_in_background(server.port, cookie)
        wait_until(lambda: lock_holder(locking_store, key) is not None, 10, "the app server to take the lock")
        time.sleep(2.5 * expiry)
        assert _busy(probe, cookie), "renewal should have kept the live holder's lock"
        server.kill()
        killed = time.monotonic()
        left = lock_ttl(locking_store, key)
        measured = time.monotonic()
        assert left is not None and _busy(probe, cookie), "the dead holder's lock must outlive it a while"
        response = client_for(mw, cookie).get("/inc")
        acquired = time.monotonic()
    finally:
        server.kill()
    assert response.status_code == 200 and response.data == b"2"  # the killed request saved nothing
    wait_until(lambda: outcome, 10, "the killed request's connection to end")
    assert not isinstance(outcome[0], int), f"the killed request answered {outcome[0]}"
    waited = acquired - killed
    assert waited < expiry + 3, f"waited {waited:.2f}s for a lock expiring {expiry}s after its last renewal"
    if locking_store.kind != "memcached":  # Redis expires to the millisecond: not before
        assert acquired - measured >= left - 0.05, (left, acquired - measured)
    assert debug_log.records[-1]["lock_wait_ms"] > 0
    print(f"{locking_store.kind}: lock left {left}s at the kill, next request waited {waited:.2f}s")
    mw.manager.close()
    probe.manager.close()


def test_stale_owner_cannot_release_or_renew_anothers_lock(locking_store: RealStore):
    """A holder whose lock expired (paused, partitioned) must not free the lock its successor holds."""
    store = open_store(locking_store.url)
    key = f"sessionstore:{{{new_id()}}}"
    assert store.lock(key, "stale-owner", 2.0)[0]
    assert not store.lock(key, "fresh-owner", 10.0)[0]
    wait_until(lambda: store.lock(key, "fresh-owner", 10.0)[0], 5, "the stale lock to expire")
    assert store.unlock(key, "stale-owner") is False
    assert store.renew(key, "stale-owner", 10.0) is False
    assert store.save_and_unlock(key, b"data", 60, ANY, "stale-owner").ok  # the write is not the lock's
    assert lock_holder(locking_store, key) == b"fresh-owner"
    assert not store.lock(key, "third", 10.0)[0]
    assert store.unlock(key, "fresh-owner") is True
    assert lock_holder(locking_store, key) is None
    assert store.lock(key, "third", 10.0)[0]
    store.unlock(key, "third")
    store.delete(key)
    store.close()


# -- 7, 8. which requests lock, and what a lock costs ---------------------------------------------------


@contextmanager
def server_log(ports: list[int]) -> Iterator[list[bytes]]:
    """Every command the Redis servers on ``ports`` ran during the block, script-run ones included."""
    marks = {}
    for port in ports:
        with redis_client(port) as client:
            newest = client.slowlog_get(1)
            marks[port] = newest[0]["id"] if newest else -1
    lines: list[bytes] = []
    yield lines
    for port in ports:
        with redis_client(port) as client:
            lines.extend(e["command"] for e in reversed(_slowlog_after(client, marks[port])))


def _slowlog_after(client, mark: int) -> list[dict]:
    """Slowlog entries newer than id ``mark``, newest first (read in growing pages)."""
    n = 64
    while True:
        entries = client.slowlog_get(n)
        if len(entries) < n or entries[-1]["id"] <= mark:
            return [e for e in entries if e["id"] > mark]
        n *= 4


def sent_and_locked(ports: list[int], client: ServerClient, path: str, **kwargs):
    """(response, commands clients sent, whether any command touched a session lock), server-side."""
    response, sent, lines = traced(ports, client, path, **kwargs)
    return response, sent, any(b":lock" in line for line in lines)


def traced(ports: list[int], client: ServerClient, path: str, **kwargs):
    """(response, names of the commands clients sent, every command line the servers ran)."""
    for port in ports:
        redis_commands(port)  # start counting here
    with server_log(ports) as lines:
        response = client.get(path, **kwargs)
    return response, [name for port in ports for name in redis_commands(port)], lines


def test_auto_locking_learns_read_only_paths_on_real_redis(redis_server):
    """``locking="auto"``, checked in the server's log: a path seen not to modify the session
    sends no lock command any more; once a request there modifies it, it is locked again."""
    mw = middleware(redis_server.url, locking="auto")
    client, _ = login(mw)
    ports = [redis_server.port]
    client.get("/inc/warm-up")  # the server loads the lock+load and save+unlock scripts
    client.get("/warm-up")  # ... and the unlock script
    for _ in range(AUTO_READ_ONLY_AFTER):  # not known yet: locked (lock+load, unlock)
        assert sent_and_locked(ports, client, "/page")[1:] == (["evalsha", "evalsha"], True)
    for _ in range(3):  # seen not to modify: a plain GETEX, no lock command at all
        assert sent_and_locked(ports, client, "/page")[1:] == (["getex"], False)
    response, sent, locked = sent_and_locked(ports, client, "/page", query_string="write")
    assert (sent, locked) == (["getex", "evalsha"], False) and "saved=1" in debug_header(response)
    for _ in range(AUTO_READ_ONLY_AFTER):  # it modified the session: locked again until relearned
        assert sent_and_locked(ports, client, "/page")[1:] == (["evalsha", "evalsha"], True)
    assert sent_and_locked(ports, client, "/page")[1:] == (["getex"], False)
    assert sent_and_locked(ports, client, "/other")[1:] == (["evalsha", "evalsha"], True)  # per path
    mw.manager.close()


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_lock_shares_the_round_trips_of_load_and_save_on_redis(kind, request):
    """``locking="all"``: lock+load is one script, save+unlock another: 2 commands either way."""
    server = request.getfixturevalue("redis_server" if kind == "redis" else "redis_cluster")
    ports = [server.port] if kind == "redis" else server.ports
    mw = middleware(server.url, locking="all")
    client, cookie = login(mw)
    key = mw.manager.key(mw.manager.signer.unsign(cookie))
    client.get("/inc/warm-up")  # scripts loaded once (on every primary of a cluster) ...
    client.get("/read")  # ... the unlock script too
    for path in ("/inc/n", "/read"):
        response, sent, lines = traced(ports, client, path)
        assert sent == ["evalsha", "evalsha"], path
        assert "saved=%d" % (path == "/inc/n") in debug_header(response)
        assert any(line.startswith(b"SET " + companion_key(key, "lock").encode()) for line in lines)
        assert any(line.startswith(b"DEL " + companion_key(key, "lock").encode()) for line in lines)
    assert stored(mw, cookie)["n"] == 1
    mw.manager.close()


def test_lock_costs_on_memcached(memcached_cluster, steady_polls):
    """memcached cannot run scripts: lock = add + gats, unlock = gets + md (documented in the store)."""
    store = RealStore("memcached", memcached_cluster.url(), [s.port for s in memcached_cluster.servers],
                      memcached_command_count)
    mw = middleware(store.url, locking="all")
    client, cookie = login(mw)
    for path, expected in (("/read", 4), ("/inc/n", 6)):
        before = store.commands()
        assert client.get(path).status_code == 200
        assert store.commands() - before == expected, path
    mw.manager.close()

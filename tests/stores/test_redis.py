"""Redis store against real servers: standalone, TLS, Sentinel and Cluster.

Every topology runs the shared contract suite plus the lock protocol. Then:
server-counted command costs, TTL presence after every write, faults
(server stopped, nothing listening), a Sentinel failover after ``kill -9``,
Cluster slot placement, and URL parsing.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any, Callable

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from sessionstore.errors import ConfigError, CorruptPayload, StoreError, StoreUnavailable
from sessionstore.stores.base import ANY, Record, close_counter, companion_key, open_counter
from sessionstore.stores import redis as redis_module
from sessionstore.stores.redis import RedisStore, _parse_url
from tests.servers.process import free_port
from tests.servers.redis_fixtures import redis_client, redis_commands

from .contract import FeedContract, IndexContract, LockingContract


def session_key() -> str:
    """A key as the manager builds it: ``<prefix>{<id>}``."""
    return "sessionstore:{" + uuid.uuid4().hex + "}"


@pytest.fixture
def key() -> str:
    return session_key()


class RedisContract(LockingContract):
    """The store contract plus the lock protocol; subclasses provide ``store``."""

    @pytest.fixture
    def key(self) -> str:
        return session_key()

    @pytest.fixture
    def elapse(self) -> Callable[[float], None]:
        return time.sleep

    def test_renew_extends_the_lock(self, store, key):
        assert store.lock(key, "a", 0.4)[0]
        time.sleep(0.25)
        assert store.renew(key, "a", 1)
        time.sleep(0.3)  # past the first expiry
        assert store.lock(key, "b", 5)[0] is False

    def test_version_changes_when_a_deleted_key_is_created_again(self, store, key):
        first = store.save(key, b"same", 60, expect=None).version
        store.delete(key)
        second = store.save(key, b"same", 60, expect=None).version
        assert second != first
        assert not store.save(key, b"stale", 60, expect=first).ok


# -- topologies ----------------------------------------------------------------


def _store(url: str):
    store = RedisStore.from_url(url)
    yield store
    store.close()


class TestStandalone(RedisContract, IndexContract, FeedContract):
    @pytest.fixture
    def store(self, redis_server):
        yield from _store(redis_server.url)


class TestTLS(RedisContract):
    @pytest.fixture
    def store(self, redis_tls_server):
        yield from _store(redis_tls_server.url)


class TestSentinel(RedisContract):
    @pytest.fixture
    def store(self, redis_sentinel):
        yield from _store(redis_sentinel.url)


class TestCluster(RedisContract, IndexContract, FeedContract):
    @pytest.fixture
    def store(self, redis_cluster):
        yield from _store(redis_cluster.url)


# -- cost ------------------------------------------------------------------------


def _operations(store: RedisStore, key: str) -> dict[str, Callable[[], Any]]:
    """Every store call, ready to run on ``key`` (which holds a saved session)."""
    return {
        "load": lambda: store.load(key),
        "load_and_touch": lambda: store.load_and_touch(key, 60),
        "load_and_touch(None)": lambda: store.load_and_touch(key, None),
        "save": lambda: store.save(key, b"x", 60),
        "save(expect=None)": lambda: store.save(key, b"x", 60, expect=None),
        "save(expect=version)": lambda: store.save(key, b"x", 60, expect="0" * 16),
        "touch": lambda: store.touch(key, 60),
        "touch(None)": lambda: store.touch(key, None),
        "delete(expect=version)": lambda: store.delete(key, expect="0" * 16),
        "lock": lambda: store.lock(key, "t", 5),
        "lock(load)": lambda: store.lock(key, "t", 5, load_ttl=60),
        "renew": lambda: store.renew(key, "t", 5),
        "unlock": lambda: store.unlock(key, "t"),
        "save_and_unlock": lambda: store.save_and_unlock(key, b"x", 60, ANY, "t"),
        "delete": lambda: store.delete(key),
    }


_EXPECTED_COMMANDS = {
    "load": ["get"],
    "load_and_touch": ["getex"],
    "load_and_touch(None)": ["getex"],
    "save": ["evalsha"],
    "save(expect=None)": ["evalsha"],
    "save(expect=version)": ["evalsha"],
    "touch": ["pexpire"],
    "touch(None)": ["evalsha"],
    "delete(expect=version)": ["evalsha"],
    "lock": ["set"],
    "lock(load)": ["evalsha"],
    "renew": ["evalsha"],
    "unlock": ["evalsha"],
    "save_and_unlock": ["evalsha"],
    "delete": ["del"],
}


def _counted(call: Callable[[], Any]) -> int:
    counter, token = open_counter()
    try:
        call()
    finally:
        close_counter(token)
    return counter.n


def test_each_call_is_one_command_counted_by_the_server(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    store.save(key, b"data", 60)
    operations = _operations(store, key)
    for call in operations.values():  # loads every script once
        call()
    redis_commands(redis_server.port)
    for name, call in operations.items():
        counted = _counted(call)
        assert redis_commands(redis_server.port) == _EXPECTED_COMMANDS[name], name
        assert counted == 1, name
    store.close()


def test_scripts_are_loaded_once_after_the_server_forgets_them(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    with redis_client(redis_server.port) as client:
        client.script_flush()
    redis_commands(redis_server.port)
    store.save(key, b"a", 60)
    assert redis_commands(redis_server.port) == ["evalsha", "script", "evalsha"]
    store.save(key, b"b", 60)
    store.save(key, b"c", 60)
    assert redis_commands(redis_server.port) == ["evalsha", "evalsha"]
    store.close()


def test_cluster_calls_are_one_command(redis_cluster, key):
    store = RedisStore.from_url(redis_cluster.url)
    operations = _operations(store, key)
    store.save(key, b"data", 60)
    for call in operations.values():
        call()
    for port in redis_cluster.ports:
        redis_commands(port)
    for name in ("load_and_touch", "save", "lock(load)", "save_and_unlock"):
        operations[name]()
        sent = [c for port in redis_cluster.ports for c in redis_commands(port)]
        assert sent == _EXPECTED_COMMANDS[name], name
    store.close()


# -- expiry ------------------------------------------------------------------------


def _pttl(port: int, key: str) -> int:
    with redis_client(port) as client:
        return client.pttl(key)


def test_every_write_sets_the_ttl(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    port = redis_server.port
    lock_key = companion_key(key, "lock")
    writes: list[tuple[str, Callable[[], Any], int]] = [
        ("create", lambda: store.save(key, b"a", 60, expect=None), 60_000),
        ("save", lambda: store.save(key, b"b", 70), 70_000),
        ("conditional save", lambda: store.save(key, b"c", 80, expect=store.load(key).version), 80_000),
        ("touch", lambda: store.touch(key, 90), 90_000),
        ("load_and_touch", lambda: store.load_and_touch(key, 100), 100_000),
        ("lock with load", lambda: store.lock(key, "t", 5, load_ttl=110), 110_000),
        ("save_and_unlock", lambda: store.save_and_unlock(key, b"d", 120, ANY, "t"), 120_000),
    ]
    for name, write, ttl_ms in writes:
        write()
        assert ttl_ms - 2_000 < _pttl(port, key) <= ttl_ms, name
    store.lock(key, "t", 5)
    assert 0 < _pttl(port, lock_key) <= 5_000
    store.renew(key, "t", 30)
    assert 5_000 < _pttl(port, lock_key) <= 30_000
    store.close()


def test_no_ttl_means_no_expiry(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    port = redis_server.port
    store.save(key, b"a", None)
    assert _pttl(port, key) == -1
    store.save(key, b"b", 60)
    assert _pttl(port, key) > 0
    assert store.touch(key, None) is True
    assert _pttl(port, key) == -1
    assert store.touch(key, None) is True  # already without expiry: still there
    store.load_and_touch(key, 60)
    assert _pttl(port, key) > 0
    assert store.load_and_touch(key, None).data == b"b"
    assert _pttl(port, key) == -1
    assert store.touch(session_key(), None) is False
    store.close()


def test_a_key_is_never_seen_without_its_ttl(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            store.save(key, b"x" * 1000, 60, expect=None)
            store.save(key, b"y" * 1000, 60)
            store.delete(key)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with redis_client(redis_server.port) as client:
            seen = {client.pttl(key) for _ in range(2000)}
    finally:
        stop.set()
        thread.join()
    assert -1 not in seen
    store.close()


# -- values ------------------------------------------------------------------------


def test_foreign_value_is_a_corrupt_payload(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    with redis_client(redis_server.port) as client:
        client.set(key, b"not ours")
    with pytest.raises(CorruptPayload):
        store.load(key)
    store.close()


def test_value_is_version_then_payload(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    version = store.save(key, b"payload", 60).version
    with redis_client(redis_server.port) as client:
        assert client.get(key) == version.encode() + b"payload"
    store.close()


# -- faults ------------------------------------------------------------------------


def _assert_all_unavailable(store: RedisStore, key: str, only: tuple[str, ...] = ()) -> None:
    """Each call (or those named in ``only``) raises StoreUnavailable within 2 s."""
    for name, call in _operations(store, key).items():
        if only and name not in only:
            continue
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            call()
        assert time.monotonic() - started < 2.0, name


def test_stopped_server_is_unavailable_then_recovers(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    store.save(key, b"before", 60)  # a pooled connection to the server that will die
    redis_server.stop()
    try:
        _assert_all_unavailable(store, key)
        fresh = RedisStore.from_url(redis_server.url)
        _assert_all_unavailable(fresh, key, only=("load_and_touch", "save"))
    finally:
        redis_server.start()
    assert store.save(key, b"after", 60).ok
    assert store.load(key).data == b"after"
    assert fresh.load(key).data == b"after"
    store.close()
    fresh.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:{port}/0",
        "redis+sentinel://127.0.0.1:{port},127.0.0.1:{port2}/mymaster/0",
        "redis+cluster://127.0.0.1:{port}",
    ],
    ids=["standalone", "sentinel", "cluster"],
)
def test_nothing_listening_is_unavailable(url, key):
    store = RedisStore.from_url(url.format(port=free_port(), port2=free_port()))
    _assert_all_unavailable(store, key, only=("load_and_touch", "save", "lock(load)"))
    store.close()


def test_unknown_sentinel_master_is_unavailable(redis_sentinel, key):
    url = redis_sentinel.url.replace("/mymaster/", "/nosuchmaster/")
    store = RedisStore.from_url(url)
    with pytest.raises(StoreUnavailable):
        store.load(key)
    store.close()


def test_tls_with_an_untrusted_certificate_is_unavailable(redis_tls_server, key):
    store = RedisStore.from_url(redis_tls_server.url.split("?")[0])
    with pytest.raises(StoreUnavailable):
        store.load(key)
    store.close()
    insecure = RedisStore.from_url(redis_tls_server.url.split("?")[0] + "?ssl_cert_reqs=none")
    assert insecure.load(key) is None
    insecure.close()


def test_sentinel_failover_keeps_every_saved_session(redis_sentinel):
    store = RedisStore.from_url(redis_sentinel.url)
    sessions = {session_key(): os.urandom(64) for _ in range(200)}
    versions = {k: store.save(k, data, 300).version for k, data in sessions.items()}
    old = redis_sentinel.master_port()
    with redis_client(old) as client:  # replication is asynchronous: wait for it
        client.incr("sessionstore:test:replication-barrier")
        assert client.wait(1, 5000) == 1
    redis_sentinel.nodes[old].kill()
    probe = next(iter(sessions))
    try:
        new = _wait_failover_while_serving(redis_sentinel, store, probe, old)
        assert new != old
        for k, data in sessions.items():
            assert store.load(k) == Record(data, versions[k]), k
        result = store.save(probe, b"after failover", 300, expect=versions[probe])
        assert result.ok
        with redis_client(new) as client:
            assert client.get(probe) == result.version.encode() + b"after failover"
    finally:
        redis_sentinel.restore(old)
        store.close()


def _wait_failover_while_serving(topology, store: RedisStore, key: str, old: int) -> int:
    """Wait for the new master, meanwhile checking the store answers or fails promptly."""
    done: list[int] = []
    waiter = threading.Thread(target=lambda: done.append(topology.wait_failover(old)))
    waiter.start()
    while waiter.is_alive():
        started = time.monotonic()
        try:
            store.load(key)
        except StoreUnavailable:
            pass
        assert time.monotonic() - started < 3
        time.sleep(0.1)
    waiter.join()
    assert done, "the sentinels did not fail over"
    return done[0]


# -- cluster ------------------------------------------------------------------------


def test_cluster_keys_spread_over_every_node(redis_cluster):
    store = RedisStore.from_url(redis_cluster.url)
    keys = [session_key() for _ in range(300)]
    versions = {k: store.save(k, k.encode(), 60).version for k in keys}
    for k in keys:
        assert store.load(k) == Record(k.encode(), versions[k])
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    try:
        assert {client.get_node_from_key(k).port for k in keys} == set(redis_cluster.ports)
    finally:
        client.close()
    assert len({key_slot(k.encode()) for k in keys}) > 250
    store.close()


def test_session_key_and_companions_share_a_slot(key):
    slot = key_slot(key.encode())
    for suffix in ("lock", "tombstone", "index"):
        assert key_slot(companion_key(key, suffix).encode()) == slot


def test_cluster_lock_on_a_key_without_hash_tag_is_a_store_error(redis_cluster):
    store = RedisStore.from_url(redis_cluster.url)
    key = next(
        k for k in (f"sessionstore:{uuid.uuid4().hex}" for _ in range(100))
        if key_slot(k.encode()) != key_slot(companion_key(k, "lock").encode())
    )
    with pytest.raises(StoreError) as raised:
        store.lock(key, "t", 5, load_ttl=60)
    assert not isinstance(raised.value, StoreUnavailable)
    store.close()


# -- URLs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, hosts, db, service",
    [
        ("redis://127.0.0.1:6380/2", [("127.0.0.1", 6380)], 2, None),
        ("redis://localhost", [("localhost", 6379)], 0, None),
        ("rediss://:s3cret@cache.example:6390/", [("cache.example", 6390)], 0, None),
        ("redis://[::1]:7000/1", [("::1", 7000)], 1, None),
        ("redis+sentinel://h1:1,h2/main/3", [("h1", 1), ("h2", 26379)], 3, "main"),
        ("redis+sentinel://h1:1/main", [("h1", 1)], 0, "main"),
        ("redis+cluster://h1:7000,h2:7001", [("h1", 7000), ("h2", 7001)], 0, None),
    ],
)
def test_url_parsing(url, hosts, db, service):
    parsed = _parse_url(url)
    assert (parsed.hosts, parsed.db, parsed.service) == (hosts, db, service)


def test_url_credentials_and_options():
    parsed = _parse_url(
        "rediss://user:p%40ss@h:1/0?socket_timeout=0.5&retries=7&max_connections=20"
        "&health_check_interval=30&ssl_cert_reqs=none&ssl_check_hostname=false"
    )
    assert (parsed.username, parsed.password) == ("user", "p@ss")
    kwargs = parsed.connection_kwargs()
    assert kwargs["socket_timeout"] == 0.5 and kwargs["socket_connect_timeout"] == 1.0
    assert kwargs["retry"].get_retries() == 7 and kwargs["max_connections"] == 20
    assert kwargs["health_check_interval"] == 30
    assert kwargs["ssl_cert_reqs"] == "none" and kwargs["ssl_check_hostname"] is False


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1",
        "redis://h:1,h2:2/0",
        "redis://h:99999",
        "redis://h:1/notadb",
        "redis://h:1/0/extra",
        "redis+sentinel://h:1",
        "redis+cluster://h:1/3",
        "redis://h:1/0?unknown=1",
        "redis://h:1/0?socket_timeout=-1",
        "redis://h:1/0?socket_timeout=soon",
        "redis://h:1/0?retries=1&retries=2",
        "redis://h:1/0?ssl_cert_reqs=none",
        "rediss://h:1/0?ssl_cert_reqs=sometimes",
        "redis://:hunter2@h:1/0?bogus=1",
    ],
)
def test_bad_url_is_a_config_error(url):
    with pytest.raises(ConfigError) as raised:
        RedisStore.from_url(url)
    assert raised.value.field == "store"
    assert "hunter2" not in str(raised.value)


# -- retried calls -----------------------------------------------------------------


def test_a_retried_save_finds_its_own_write(redis_server, key, monkeypatch):
    """A save re-sent after a timeout, its first attempt applied, still succeeds."""
    store = RedisStore.from_url(redis_server.url)
    first = store.save(key, b"v1", 60).version
    monkeypatch.setattr(redis_module, "_new_version", lambda: "f" * 16)
    for _ in range(2):  # the same call twice: what redis-py's retry sends
        assert store.save(key, b"v2", 60, expect=first).ok
    assert store.load(key) == Record(b"v2", "f" * 16)
    store.close()


def test_a_lock_holder_taking_it_again_keeps_it(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    assert store.lock(key, "a", 5)[0] and store.lock(key, "a", 5)[0]
    assert store.lock(key, "a", 5, load_ttl=60) == (True, None)
    assert store.lock(key, "b", 5)[0] is False
    store.close()


# -- index and feed: costs, layout, TTLs ------------------------------------------------


def _ix(value: str) -> str:
    from sessionstore.index import index_key

    return index_key("sessionstore:", "cas", value)


def test_index_calls_counted_by_the_server(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    port = redis_server.port
    store.save(key, b"data", 60)
    names = [_ix(f"ST-{uuid.uuid4().hex}") for _ in range(2)]
    store.index_add(key, names, 60)  # loads the scripts
    store.index_find(names[0])
    store.index_drop(key)
    store.index_add(key, names, 60)
    redis_commands(port)
    assert _counted(lambda: store.index_add(key, names, 60)) == 1
    assert redis_commands(port) == ["evalsha"]  # reverse set and both forward keys, one script
    assert _counted(lambda: store.index_find(names[0])) == 2
    assert redis_commands(port) == ["evalsha", "exists"]
    assert _counted(lambda: store.index_drop(key)) == 2
    assert redis_commands(port) == ["smembers", "evalsha"]
    assert _counted(lambda: store.index_find(names[1])) == 1  # nothing under it: no EXISTS
    assert _counted(lambda: store.feed_publish("sessionstore:inv", b"{}")) == 1  # PUBLISH
    store.close()


def test_index_layout_and_ttls(redis_server, key):
    store = RedisStore.from_url(redis_server.url)
    store.save(key, b"data", 60)
    ix = _ix("ST-layout")
    store.index_add(key, [ix], 100)
    with redis_client(redis_server.port) as client:
        reverse = companion_key(key, "ix")
        assert client.smembers(reverse) == {ix.encode()}
        assert 99_000 < client.pttl(reverse) <= 100_000 and 99_000 < client.pttl(ix) <= 100_000
        (member, score), = client.zrange(ix, 0, -1, withscores=True)
        assert member == key.encode() and abs(score / 1000 - time.time() - 100) < 5
        store.index_add(key, [ix], 50)  # never shortened
        assert client.pttl(ix) > 90_000
        store.index_add(key, [ix], None)  # a session without TTL: its entries neither
        assert client.pttl(ix) == -1 and client.pttl(reverse) == -1
        assert client.zscore(ix, key) == float("inf")
    store.close()


def test_cluster_index_calls_are_one_script_per_slot(redis_cluster, key):
    store = RedisStore.from_url(redis_cluster.url)
    store.save(key, b"data", 60)
    names = [_ix(f"ST-{i}-{uuid.uuid4().hex}") for i in range(3)]
    slots = {key_slot(companion_key(key, "ix").encode())} | {key_slot(n.encode()) for n in names}
    store.index_add(key, names, 60)
    for port in redis_cluster.ports:
        redis_commands(port)
    assert _counted(lambda: store.index_add(key, names, 60)) == len(slots)
    sent = [c for port in redis_cluster.ports for c in redis_commands(port)]
    assert sent == ["evalsha"] * len(slots)
    assert all(store.index_find(n) == [key] for n in names)
    assert store.index_drop(key) == 3
    assert all(store.index_find(n) == [] for n in names)
    store.close()

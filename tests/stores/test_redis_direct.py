"""The Redis store's direct read connections (``stores/redis_direct.py``), against a real server.

Reads (``GET``, ``GETEX``) and scripts (``EVALSHA``) bypass redis-py's
``execute_command``; these tests check what that must not break: a restart
of the server, an error reply, a forgotten script, a forked worker process,
``close()``, parallel threads and ``max_connections``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from sessionstore.errors import CorruptPayload, StoreUnavailable
from sessionstore.stores.base import close_counter, open_counter
from sessionstore.stores.redis import RedisStore
from sessionstore.stores.redis_direct import PAUSE
from tests.servers.redis_fixtures import redis_client, redis_commands, start_redis


def _key() -> str:
    return "sessionstore:{" + uuid.uuid4().hex + "}"


@pytest.fixture
def store(redis_server):
    store = RedisStore.from_url(redis_server.url)
    yield store
    store.close()


def test_a_read_is_one_command_on_its_own_connection(store, redis_server):
    key = _key()
    store.save(key, b"payload", 60)
    counter, token = open_counter()
    try:
        assert store.load_and_touch(key, 60).data == b"payload"
        assert store.load(key).data == b"payload"
    finally:
        close_counter(token)
    assert counter.n == 2
    with redis_client(redis_server.port) as client:
        names = [c["cmd"] for c in client.client_list()]
    assert "getex" in names or "get" in names  # the direct connection is a client of its own


def test_a_read_after_the_server_restarted_reconnects(store, redis_server):
    key = _key()
    store.save(key, b"before", 60)
    assert store.load(key).data == b"before"  # the direct connection now exists
    redis_server.stop()
    redis_server.start()
    assert store.load(key) is None  # the server kept nothing; the dead connection was replaced
    store.save(key, b"after", 60)
    assert store.load_and_touch(key, 60).data == b"after"


def test_an_error_reply_is_raised_and_the_next_read_works(store, redis_server):
    """WRONGTYPE: the key holds a value that is not ours, so CorruptPayload (a corrupt-payload
    cause, not a failed request); the connection that got the error reply stays usable."""
    wrong, good = _key(), _key()
    with redis_client(redis_server.port) as client:
        client.rpush(wrong, b"not a string")
    store.save(good, b"fine", 60)
    with pytest.raises(CorruptPayload, match="another type"):
        store.load(wrong)
    for _ in range(3):
        assert store.load(good).data == b"fine"


def test_close_then_read_reconnects(store):
    key = _key()
    store.save(key, b"x", 60)
    assert store.load(key).data == b"x"
    store.close()
    assert store.load(key).data == b"x"


def test_threads_never_share_a_connection(store):
    keys = [_key() for _ in range(8)]
    for i, key in enumerate(keys):
        store.save(key, f"value-{i}".encode(), 60)
    wrong: list[str] = []

    def reader(i: int) -> None:
        for _ in range(300):
            record = store.load_and_touch(keys[i], 60)
            if record is None or record.data != f"value-{i}".encode():
                wrong.append(f"thread {i} read {record!r}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_a_forked_child_reads_on_a_connection_of_its_own(store):
    parent_key, child_key = _key(), _key()
    store.save(parent_key, b"parent", 60)
    store.save(child_key, b"child", 60)
    assert store.load(parent_key).data == b"parent"  # the parent's direct connection exists before the fork
    pid = os.fork()
    if pid == 0:  # the child: a shared socket would interleave replies with the parent's
        code = 0
        try:
            for _ in range(300):
                record = store.load(child_key)
                if record is None or record.data != b"child":
                    code = 1
        except BaseException:
            code = 2
        os._exit(code)
    wrong = 0
    for _ in range(300):
        record = store.load(parent_key)
        if record is None or record.data != b"parent":
            wrong += 1
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert wrong == 0


def test_max_connections_bounds_the_direct_connections_too(redis_server):
    url = redis_server.url.rsplit("/", 1)[0] + "/7?max_connections=1"  # db 7: only this store's connections
    store = RedisStore.from_url(url)
    key = _key()
    store.save(key, b"x", 60)
    outcomes: list[str] = []

    def reader() -> None:
        for _ in range(100):
            try:
                outcomes.append("ok" if store.load(key).data == b"x" else "wrong")
            except StoreUnavailable:  # both bounds reached: fail fast, as the client's pool does
                outcomes.append("unavailable")

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with redis_client(redis_server.port) as client:
        ours = [c for c in client.client_list() if int(c["db"]) == 7]
    store.close()
    assert "wrong" not in outcomes and outcomes.count("ok") >= 100
    assert 1 <= len(ours) <= 2  # one direct connection, one in the client's pool


def test_scripts_go_direct_and_are_loaded_once_after_the_server_forgets_them(store, redis_server):
    key = _key()
    store.save(key, b"a", 60)
    assert store.load(key).data == b"a"  # direct connections exist from here on
    with redis_client(redis_server.port) as client:
        client.script_flush()
    redis_commands(redis_server.port)
    assert store.save(key, b"b", 60).ok
    assert redis_commands(redis_server.port) == ["evalsha", "script", "evalsha"]
    version = store.load(key).version
    redis_commands(redis_server.port)
    assert store.save(key, b"c", 60, expect=version).ok
    assert redis_commands(redis_server.port) == ["evalsha"]


def test_a_save_after_the_server_restarted_goes_through(store, redis_server):
    key = _key()
    store.save(key, b"before", 60)
    store.save(key, b"again", 60)  # the direct connection now exists
    redis_server.stop()
    redis_server.start()  # an empty server: no key, no script
    result = store.save(key, b"after", 60, expect=None)
    assert result.ok
    assert store.load(key).data == b"after"


def test_a_frozen_server_costs_one_direct_timeout_then_the_client_alone(tmp_path):
    """SIGSTOP: the first read pays the direct attempt's timeout plus the client's; reads in
    the next PAUSE seconds pay the client's alone; after SIGCONT reads work again."""
    server = start_redis(tmp_path)
    store = RedisStore.from_url(f"redis://127.0.0.1:{server.port}/0?socket_timeout=0.3&retries=0")
    key = _key()
    try:
        store.save(key, b"x", 60)
        assert store.load(key).data == b"x"
        os.kill(server.pid, signal.SIGSTOP)
        try:
            timings = []
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    store.load(key)
                timings.append(time.monotonic() - started)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert 0.5 < timings[0] < 0.9, timings  # direct 0.3 s, then the client's one attempt 0.3 s
        assert all(0.2 < t < 0.5 for t in timings[1:]), timings  # the client's attempt only
        assert store.load(key).data == b"x"
        time.sleep(PAUSE)
        assert store.load(key).data == b"x"
    finally:
        store.close()
        server.stop()

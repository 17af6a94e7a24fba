"""The host-local LMDB store: the contract, and what only it promises.

Several processes share one directory (worker processes of a host); a
process killed in the middle of a write leaves no corruption and no stuck
lock; bounds evict least recently used sessions; a forked child reopens.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from sessionstore.stores.local import LocalStore, default_directory
from tests.helpers import FakeClock

from .contract import IndexContract, LockingContract


class TestLocalStore(LockingContract, IndexContract):
    @pytest.fixture
    def clock(self):
        return FakeClock()

    @pytest.fixture
    def store(self, clock, tmp_path):
        return LocalStore(tmp_path / "local", clock=clock)

    @pytest.fixture
    def elapse(self, clock):
        return clock.advance


def _increment(path: str, key: str, times: int) -> None:
    """In another process: ``times`` conditional read-modify-writes of a counter."""
    store = LocalStore(path)
    for _ in range(times):
        while True:
            record = store.load(key)
            n = int(record.data) if record else 0
            if store.save(key, str(n + 1).encode(), 60, expect=record.version if record else None).ok:
                break


def test_processes_share_one_copy_and_conditional_saves_lose_nothing(tmp_path):
    path = str(tmp_path / "shared")
    key = "sessionstore:{counter}"
    LocalStore(path)
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_increment, args=(path, key, 200)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert LocalStore(path).load(key).data == b"800"


def _write_forever(path: str, ready) -> None:
    store = LocalStore(path)
    ready.set()
    i = 0
    while True:
        i += 1
        store.save(f"sessionstore:{{k{i % 50}}}", os.urandom(3000), 60)


def test_a_writer_killed_mid_write_leaves_no_stuck_lock_nor_corruption(tmp_path):
    path = str(tmp_path / "killed")
    store = LocalStore(path)
    store.save("sessionstore:{keep}", b"kept", 60)
    ctx = multiprocessing.get_context("spawn")
    for _ in range(5):
        ready = ctx.Event()
        writer = ctx.Process(target=_write_forever, args=(path, ready))
        writer.start()
        assert ready.wait(30)
        time.sleep(0.05)  # inside a stream of write transactions
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
        started = time.monotonic()
        assert store.save("sessionstore:{after}", b"x", 60).ok
        assert time.monotonic() - started < 5  # the dead writer's mutex was taken over
    assert store.load("sessionstore:{keep}").data == b"kept"
    assert all(store.load(k) is not None for k in store.keys())
    env = store._env_for().lmdb
    env.reader_check()
    assert env.readers().count("\n") <= 2  # no slot left by the dead processes (header line only)


def test_bounds_evict_least_recently_used(tmp_path):
    clock = FakeClock()
    store = LocalStore(tmp_path / "lru", clock=clock, max_sessions=3, max_bytes=10_000_000)
    for i in range(3):
        store.save(f"sessionstore:{{k{i}}}", b"x" * 10, 60)
        clock.advance(2)
    store.load_and_touch("sessionstore:{k0}", 60)  # k0 is now the most recent
    clock.advance(2)
    store.save("sessionstore:{k3}", b"y" * 10, 60)
    assert store.load("sessionstore:{k1}") is None
    assert {k for k in store.keys()} == {"sessionstore:{k0}", "sessionstore:{k2}", "sessionstore:{k3}"}


def test_byte_bound_evicts_and_companions_outlive_sessions(tmp_path):
    store = LocalStore(tmp_path / "bytes", max_bytes=20_000)
    store.save("sessionstore:{a}:t", b"tombstone", 600)
    for i in range(20):
        store.save(f"sessionstore:{{s{i}}}", os.urandom(2000), 60)
    assert store.nbytes <= 20_000 and len(store) < 20
    assert store.load("sessionstore:{a}:t").data == b"tombstone"


def test_payloads_are_compressed_when_it_pays(tmp_path):
    store = LocalStore(tmp_path / "zip")
    data = b'{"cart": ["item", "item", "item"], "user": "someone"}' * 40
    store.save("sessionstore:{z}", data, 60)
    assert store.load("sessionstore:{z}").data == data
    assert store.nbytes < len(data) / 3


def test_expired_sessions_are_swept_by_later_writes(tmp_path):
    clock = FakeClock()
    store = LocalStore(tmp_path / "sweep", clock=clock)
    for i in range(10):
        store.save(f"sessionstore:{{old{i}}}", b"x", 1)
    clock.advance(5)
    store.save("sessionstore:{fresh}", b"y", 60)
    assert len(store) == 1


def _child_counts(path: str, queue) -> None:
    queue.put(len(LocalStore(path)))


def test_a_forked_child_reopens_and_sees_the_parents_data(tmp_path):
    store = LocalStore(tmp_path / "fork")
    store.save("sessionstore:{p}", b"parent", 60)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    pid = os.fork()
    if pid == 0:  # the child uses the inherited store object (gunicorn --preload)
        try:
            ok = store.load("sessionstore:{p}").data == b"parent" and store.save("sessionstore:{c}", b"child", 60).ok
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.load("sessionstore:{c}").data == b"child"


def test_two_applications_get_two_directories():
    assert default_directory("sessionstore:", "session", "/srv/a") != default_directory("sessionstore:", "session", "/srv/b")
    assert default_directory("p", "c", "/srv/a") == default_directory("p", "c", "/srv/a")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs of our own: the file system under the store fills up for real."""
    import subprocess

    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_file_system_is_store_unavailable_loses_nothing_held_and_recovers(small_tmpfs):
    from sessionstore.errors import StoreUnavailable

    store = LocalStore(small_tmpfs / "store", max_bytes=100_000_000)  # a bound the file system cannot hold
    saved = []
    with pytest.raises(StoreUnavailable, match="No space left"):
        for i in range(2000):
            data = os.urandom(3000)
            store.save(f"sessionstore:{{k{i}}}", data, 60)
            saved.append((f"sessionstore:{{k{i}}}", data))
    held = set(store.keys())
    assert held and all(store.load(k).data == d for k, d in saved if k in held)  # what it holds is intact
    for key in sorted(held)[: len(held) // 2]:
        store.delete(key)
    assert store.save("sessionstore:{after}", os.urandom(3000), 60).ok  # freed pages are used again


def test_a_full_file_system_answers_store_unavailable_not_500(small_tmpfs):
    from sessionstore import SessionMiddleware, get_session
    from tests.helpers import ServerClient

    def app(environ, start_response):
        get_session(environ)["blob"] = os.urandom(200_000).hex()
        start_response("200 OK", [])
        return [b"ok"]

    mw = SessionMiddleware(app, store=f"local://{small_tmpfs}/app", secret_key="full", debug=True)
    statuses = {ServerClient(mw).get("/").status_code for _ in range(8)}
    assert statuses <= {200, 503} and 503 in statuses


def test_forks_while_other_threads_read_and_write_cost_them_nothing(tmp_path):
    """A fork closes the environment (LMDB cannot cross fork); threads in the middle of calls reopen it."""
    import subprocess
    import threading

    store = LocalStore(tmp_path / "forking")
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                store.save(f"sessionstore:{{t{i}}}", str(n).encode(), 60)
                assert store.load(f"sessionstore:{{t{i}}}").data == str(n).encode()
            except BaseException as exc:  # noqa: BLE001 - the test reports any failure
                errors.append(exc)
                return
            n += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(30):  # subprocesses with a preexec_fn fork through Python's at-fork hooks
        subprocess.run(["true"], preexec_fn=lambda: None, check=True)
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []

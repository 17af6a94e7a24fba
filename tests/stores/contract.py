"""The store contract suite: every store runs these same tests.

A backend's test module subclasses :class:`StoreContract` and provides two
fixtures:

``store``
    the store under test (a real server behind it, started once per session);
``elapse``
    a callable ``elapse(seconds)`` that lets that much time pass for the
    store: a fake clock for in-process stores, a real sleep for servers.
    Tests keep the TTLs they wait out short (1-2 s).
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from sessionstore.stores.base import ANY, LockingStore, Record, SaveResult, Store


class StoreContract:
    #: Seconds a short-lived record lives in expiry tests.
    short_ttl = 1
    #: Extra time to wait past the TTL (servers expire on a 1 s granularity).
    expiry_slack = 1.1

    @pytest.fixture
    def key(self) -> str:
        return "sessionstore:{test-" + uuid.uuid4().hex + "}"

    def test_is_a_store(self, store):
        assert isinstance(store, Store)

    def test_missing_key_loads_none(self, store, key):
        assert store.load(key) is None
        assert store.load_and_touch(key, 60) is None

    def test_save_then_load(self, store, key):
        result = store.save(key, b"payload", 60)
        assert isinstance(result, SaveResult) and result.ok
        rec = store.load(key)
        assert isinstance(rec, Record)
        assert rec.data == b"payload"
        assert rec.version == result.version

    def test_binary_data_round_trips(self, store, key):
        data = bytes(range(256)) * 4 + b"\r\n\x00END\r\n"
        assert store.save(key, data, 60).ok
        assert store.load(key).data == data

    def test_large_value(self, store, key):
        data = os.urandom(512 * 1024)
        assert store.save(key, data, 60).ok
        assert store.load(key).data == data

    def test_create_only_when_absent(self, store, key):
        assert store.save(key, b"one", 60, expect=None).ok
        second = store.save(key, b"two", 60, expect=None)
        assert not second.ok
        assert second.current is not None and second.current.data == b"one"
        assert store.load(key).data == b"one"

    def test_conditional_save_on_version(self, store, key):
        v1 = store.save(key, b"v1", 60).version
        v2 = store.save(key, b"v2", 60, expect=v1)
        assert v2.ok and v2.version != v1
        stale = store.save(key, b"stale", 60, expect=v1)
        assert not stale.ok
        assert stale.current.data == b"v2" and stale.current.version == v2.version
        assert store.load(key).data == b"v2"

    def test_conditional_save_on_missing_key_fails(self, store, key):
        v1 = store.save(key, b"v1", 60).version
        assert store.delete(key)
        result = store.save(key, b"resurrected", 60, expect=v1)
        assert not result.ok and result.current is None
        assert store.load(key) is None

    def test_unconditional_save_overwrites(self, store, key):
        store.save(key, b"a", 60)
        assert store.save(key, b"b", 60, expect=ANY).ok
        assert store.load(key).data == b"b"

    def test_version_unchanged_by_touch(self, store, key):
        v = store.save(key, b"x", 60).version
        assert store.touch(key, 60)
        assert store.load_and_touch(key, 60).version == v
        assert store.save(key, b"y", 60, expect=v).ok

    def test_touch_missing_is_false(self, store, key):
        assert store.touch(key, 60) is False

    def test_delete(self, store, key):
        store.save(key, b"x", 60)
        assert store.delete(key) is True
        assert store.load(key) is None
        assert store.delete(key) is False

    def test_conditional_delete(self, store, key):
        v = store.save(key, b"x", 60).version
        store.save(key, b"y", 60)
        assert store.delete(key, expect=v) is False
        assert store.load(key).data == b"y"

    def test_expiry(self, store, key, elapse):
        store.save(key, b"x", self.short_ttl)
        elapse(self.short_ttl + self.expiry_slack)
        assert store.load(key) is None

    def test_touch_slides_expiry(self, store, key, elapse):
        store.save(key, b"x", 2)
        elapse(1.2)
        assert store.touch(key, 3)
        elapse(1.2)
        assert store.load(key) is not None

    def test_load_and_touch_slides_expiry(self, store, key, elapse):
        store.save(key, b"x", 2)
        elapse(1.2)
        assert store.load_and_touch(key, 3).data == b"x"
        elapse(1.2)
        assert store.load(key) is not None

    def test_no_ttl_never_expires(self, store, key, elapse):
        store.save(key, b"forever", None)
        elapse(self.short_ttl + self.expiry_slack)
        assert store.load(key).data == b"forever"

    def test_concurrent_writers_one_wins_each_round(self, store, key):
        """Writers racing on one version: exactly one succeeds per version."""
        base = store.save(key, b"0", 60).version
        wins: list[int] = []
        barrier = threading.Barrier(8)

        def writer(i: int) -> None:
            barrier.wait()
            if store.save(key, str(i).encode(), 60, expect=base).ok:
                wins.append(i)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert store.load(key).data == str(wins[0]).encode()

    def test_concurrent_increments_with_retry_are_exact(self, store, key):
        store.save(key, b"0", 60)

        def worker() -> None:
            for _ in range(25):
                while True:
                    rec = store.load(key)
                    if store.save(key, str(int(rec.data) + 1).encode(), 60, expect=rec.version).ok:
                        break

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.load(key).data == b"100"


class LockingContract(StoreContract):
    """The store contract plus the session-lock protocol (``LockingStore``)."""

    #: Shortest lock expiry the backend honours (memcached rounds up to whole seconds).
    lock_resolution = 0.3

    @pytest.fixture
    def other_key(self, key: str) -> str:
        return key[:-1] + ("x}" if not key.endswith("x}") else "y}")

    def test_is_a_locking_store(self, store):
        assert isinstance(store, LockingStore)

    def test_lock_is_exclusive_and_owner_only(self, store, key):
        assert store.lock(key, "a", 5) == (True, None)
        assert store.lock(key, "b", 5) == (False, None)
        assert store.unlock(key, "b") is False
        assert store.renew(key, "b", 5) is False
        assert store.lock(key, "c", 5)[0] is False  # still a's
        assert store.unlock(key, "a") is True
        assert store.unlock(key, "a") is False
        assert store.lock(key, "b", 5)[0] is True

    def test_lock_race_has_one_winner(self, store, key):
        barrier = threading.Barrier(8)
        winners: list[int] = []

        def contender(i: int) -> None:
            barrier.wait()
            if store.lock(key, f"t{i}", 5)[0]:
                winners.append(i)

        threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1

    def test_abandoned_lock_expires(self, store, key, elapse):
        assert store.lock(key, "crashed", self.lock_resolution)[0]
        assert store.lock(key, "waiting", 5)[0] is False
        elapse(self.lock_resolution + self.expiry_slack)
        assert store.lock(key, "waiting", 5)[0]
        assert store.renew(key, "crashed", 5) is False
        assert store.unlock(key, "crashed") is False

    def test_lock_with_load(self, store, key, other_key):
        version = store.save(key, b"data", 60).version
        acquired, record = store.lock(key, "a", 5, load_ttl=120)
        assert acquired and record is not None and record.data == b"data" and record.version == version
        assert store.lock(key, "b", 5, load_ttl=120) == (False, None)
        assert store.lock(other_key, "a", 5, load_ttl=120) == (True, None)

    def test_save_and_unlock(self, store, key):
        version = store.save(key, b"v1", 60).version
        store.lock(key, "a", 5)
        result = store.save_and_unlock(key, b"v2", 60, version, "a")
        assert result.ok and result.version != version
        assert store.load(key).data == b"v2"
        assert store.lock(key, "b", 5)[0]  # released

    def test_save_and_unlock_never_frees_anothers_lock(self, store, key):
        store.lock(key, "owner", 5)
        assert store.save_and_unlock(key, b"x", 60, ANY, "intruder").ok
        assert store.lock(key, "b", 5)[0] is False

    def test_save_and_unlock_on_conflict_returns_current_and_unlocks(self, store, key):
        stale = store.save(key, b"old", 60).version
        store.save(key, b"theirs", 60, expect=stale)
        store.lock(key, "a", 5)
        result = store.save_and_unlock(key, b"mine", 60, stale, "a")
        assert not result.ok and result.current is not None and result.current.data == b"theirs"
        assert store.lock(key, "b", 5)[0]

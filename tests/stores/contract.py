"""The store contract suite: every store runs these same tests.

A backend's test module subclasses :class:`StoreContract` (or
:class:`LockingContract`), adds the mixins :class:`IndexContract` and
:class:`FeedContract` for the optional protocols, and provides two
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
import re
import threading
import time
import uuid

import pytest

from sessionstore.index import index_key
from sessionstore.stores.base import ANY, IndexStore, LockingStore, PollFeed, PushFeed, Record, SaveResult, Store


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

    # Servers expire on whole seconds: a record given N seconds may go after N-1. The
    # first wait stays well inside that, the second goes past the unslid expiry.

    def test_touch_slides_expiry(self, store, key, elapse):
        store.save(key, b"x", 2)
        elapse(0.5)
        assert store.touch(key, 4)
        elapse(2.0)
        assert store.load(key) is not None

    def test_load_and_touch_slides_expiry(self, store, key, elapse):
        store.save(key, b"x", 2)
        elapse(0.5)
        assert store.load_and_touch(key, 4).data == b"x"
        elapse(2.0)
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


# -- index (single sign-out) ---------------------------------------------------------


class IndexContract:
    """The ``IndexStore`` protocol. A mixin: the test class also provides ``store`` and
    ``elapse`` (and runs :class:`StoreContract` through another base)."""

    #: Seconds a short-lived entry lives in the age-out tests, and how long past it to wait.
    index_short_ttl = 1
    index_slack = 1.1

    @staticmethod
    def session_key() -> str:
        return "sessionstore:{ix-" + uuid.uuid4().hex + "}"

    @staticmethod
    def index_key(value: str | None = None) -> str:
        """An index key as the manager builds it (any string value, unicode and spaces included)."""
        return index_key("sessionstore:", "cas", value or f"ST-{uuid.uuid4().hex} zoë Ünïcode")

    def saved(self, store, ttl: int | None = 60) -> str:
        key = self.session_key()
        assert store.save(key, b"session", ttl).ok
        return key

    def test_is_an_index_store(self, store):
        assert isinstance(store, IndexStore)

    def test_index_keys_are_valid_everywhere(self):
        ix = index_key("sessionstore:", "user", "a user name with spaces, ünïcode and \n newlines " * 50)
        assert re.fullmatch(r"sessionstore:ix:\{[0-9a-f]{64}\}", ix)
        assert index_key("p:", "a", "b\x00c") != index_key("p:", "a\x00b", "c")

    def test_add_then_find(self, store):
        key, ix = self.saved(store), self.index_key()
        store.index_add(key, [ix], 60)
        assert store.index_find(ix) == [key]

    def test_unknown_index_key_finds_nothing(self, store):
        assert store.index_find(self.index_key()) == []
        assert store.index_drop(self.session_key()) == 0

    def test_only_existing_sessions_are_found(self, store):
        key, ix = self.session_key(), self.index_key()
        store.index_add(key, [ix], 60)  # entries are written before the session itself
        assert store.index_find(ix) == []
        store.save(key, b"now it exists", 60)
        assert store.index_find(ix) == [key]
        store.delete(key)  # deleted without dropping its entries
        assert store.index_find(ix) == []

    def test_many_sessions_under_one_index_key_and_many_keys_per_session(self, store):
        ix, other = self.index_key("alice"), self.index_key()
        keys = [self.saved(store) for _ in range(3)]
        for key in keys:
            store.index_add(key, [ix], 60)
        store.index_add(keys[0], [other, ix], 60)
        assert sorted(store.index_find(ix)) == sorted(keys)
        assert store.index_find(other) == [keys[0]]

    def test_drop_removes_every_entry_of_one_session_only(self, store):
        ix, other = self.index_key(), self.index_key()
        mine, theirs = self.saved(store), self.saved(store)
        store.index_add(mine, [ix, other], 60)
        store.index_add(theirs, [ix], 60)
        assert store.index_drop(mine) == 2
        assert store.index_find(ix) == [theirs]
        assert store.index_find(other) == []
        assert store.index_drop(mine) == 0

    def test_adding_again_is_idempotent(self, store):
        key, ix = self.saved(store), self.index_key()
        store.index_add(key, [ix, ix], 60)
        store.index_add(key, [ix], 60)
        assert store.index_find(ix) == [key]
        assert store.index_drop(key) == 1

    def test_entries_age_out(self, store, elapse):
        key, ix = self.saved(store, ttl=600), self.index_key()
        store.index_add(key, [ix], self.index_short_ttl)
        elapse(self.index_short_ttl + self.index_slack)
        assert store.index_find(ix) == []

    def test_expired_session_is_not_found_and_refresh_extends_entries(self, store, elapse):
        expiring, kept, ix = self.saved(store, ttl=self.index_short_ttl), self.saved(store, ttl=600), self.index_key()
        store.index_add(expiring, [ix], 600)
        store.index_add(kept, [ix], self.index_short_ttl)
        store.index_add(kept, [ix], 600)  # a refresh: the entry now lives 600 s
        store.index_add(kept, [ix], self.index_short_ttl)  # never shortened
        elapse(self.index_short_ttl + self.index_slack)
        assert store.index_find(ix) == [kept]

    def test_entries_without_ttl_never_age_out(self, store, elapse):
        key, ix = self.saved(store, ttl=None), self.index_key()
        store.index_add(key, [ix], None)
        store.index_add(key, [ix], self.index_short_ttl)  # does not shorten "never"
        elapse(self.index_short_ttl + self.index_slack)
        assert store.index_find(ix) == [key]
        assert store.index_drop(key) == 1
        assert store.index_find(ix) == []

    def test_concurrent_adds_under_one_index_key_lose_nothing(self, store):
        ix = self.index_key("a user logged in on 8 devices at once")
        keys = [self.saved(store) for _ in range(8)]
        barrier = threading.Barrier(len(keys))

        def add(key: str) -> None:
            barrier.wait()
            store.index_add(key, [ix], 60)

        threads = [threading.Thread(target=add, args=(k,)) for k in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(store.index_find(ix)) == sorted(keys)

    def test_concurrent_adds_to_one_session_lose_nothing(self, store):
        key = self.saved(store)
        names = [self.index_key() for _ in range(6)]
        barrier = threading.Barrier(len(names))

        def add(ix: str) -> None:
            barrier.wait()
            store.index_add(key, [ix], 60)

        threads = [threading.Thread(target=add, args=(ix,)) for ix in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(store.index_find(ix) == [key] for ix in names)
        assert store.index_drop(key) == len(names)
        assert all(store.index_find(ix) == [] for ix in names)


# -- invalidation feed (sticky mode) -------------------------------------------------


class FeedReader:
    """Reads a store's feed the same way whether it pushes (subscription) or is polled."""

    def __init__(self, store, channel: str) -> None:
        self.store, self.channel = store, channel
        self.received: list[bytes] = []
        self.losses = 0
        self.subscription = None
        if isinstance(store, PushFeed):
            self.subscription = store.feed_subscribe(channel, self.received.append, self._lost)
        else:
            self.cursor = store.feed_position(channel)

    def _lost(self) -> None:
        self.losses += 1

    def wait_for(self, count: int, timeout: float = 5.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            if self.subscription is None:
                batch = self.store.feed_read(self.channel, self.cursor)
                self.cursor = batch.cursor
                self.received.extend(batch.messages)
                self.losses += batch.lost
            time.sleep(0.02)
        return list(self.received)

    def close(self) -> None:
        if self.subscription is not None:
            self.subscription.close()


class FeedContract:
    """``PushFeed`` or ``PollFeed``: every message published after a reader started reaches it,
    in order, once. A mixin like :class:`IndexContract`."""

    @pytest.fixture
    def channel(self) -> str:
        return f"sessionstore:test-{uuid.uuid4().hex}:inv"

    def test_has_a_feed(self, store):
        assert isinstance(store, (PushFeed, PollFeed))

    def test_messages_reach_every_reader_in_order(self, store, channel):
        before = b"published before anyone listened"
        store.feed_publish(channel, before)
        readers = [FeedReader(store, channel) for _ in range(2)]
        try:
            messages = [b'{"i": ["a"]}', bytes(range(256)), "zoë".encode()]
            for message in messages:
                store.feed_publish(channel, message)
            for reader in readers:
                assert reader.wait_for(len(messages)) == messages
                assert reader.losses == 0
            time.sleep(0.1)
            assert all(reader.wait_for(len(messages) + 1, timeout=0.3) == messages for reader in readers)
        finally:
            for reader in readers:
                reader.close()

    def test_channels_are_separate(self, store, channel):
        reader = FeedReader(store, channel)
        try:
            store.feed_publish(channel + "-other", b"not for us")
            store.feed_publish(channel, b"for us")
            assert reader.wait_for(1) == [b"for us"]
        finally:
            reader.close()

    def test_concurrent_publishers_lose_nothing(self, store, channel):
        reader = FeedReader(store, channel)
        try:
            def publish(i: int) -> None:
                for j in range(5):
                    store.feed_publish(channel, f"{i}-{j}".encode())

            threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(reader.wait_for(20)) == sorted(f"{i}-{j}".encode() for i in range(4) for j in range(5))
        finally:
            reader.close()

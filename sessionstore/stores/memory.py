"""In-process memory store: the embedded default, and sticky mode's local cache.

Thread-safe (one lock, held only for dictionary operations). Expiry is
checked on every read against the injected clock; expired entries are also
swept a bounded number at a time on writes, so memory never grows with dead
sessions and no request pays for a full scan. Optionally bounded by entry
count and total bytes, evicting the least recently used entries.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
from collections import OrderedDict
import logging
from typing import Any, Callable, Sequence

from .base import ANY, NO_LOAD, Record, SaveResult, count_ops

_log = logging.getLogger("sessionstore")

__all__ = ["MemoryStore"]

_SWEEP_BATCH = 16


def _no_count(n: int = 1) -> None:
    pass


class MemoryStore:
    """A dictionary of ``key -> (data, version, expires_at)``."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        on_evict: Callable[[str], None] | None = None,
        counted: bool = True,
    ) -> None:
        """``counted=False``: calls are not store commands of the request (a local cache)."""
        self._clock = clock
        self._tally = count_ops if counted else _no_count
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._on_evict = on_evict
        self._entries: OrderedDict[str, tuple[bytes, int, float | None]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self._locks: dict[str, tuple[str, float]] = {}  # session key -> (owner token, expires at)
        # index: index key -> {session key: entry expiry}; session key -> (its index keys, expiry)
        self._forward: dict[str, dict[str, float | None]] = {}
        self._reverse: OrderedDict[str, tuple[set[str], float | None]] = OrderedDict()
        self._channels: dict[str, list["_MemorySubscription"]] = {}

    # -- helpers (lock held) -------------------------------------------------

    def _live(self, key: str, now: float) -> tuple[bytes, int, float | None] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires = entry[2]
        if expires is not None and expires <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[0])

    def _expires(self, ttl: int | None, now: float) -> float | None:
        return None if ttl is None else now + ttl

    def _sweep(self, now: float) -> None:
        """Drop a bounded number of expired entries from the cold end."""
        for key in list(itertools.islice(self._entries, _SWEEP_BATCH)):
            expires = self._entries[key][2]
            if expires is not None and expires <= now:
                self._drop(key)

    def _evict(self) -> list[str]:
        evicted = []
        while self._entries and (
            (self._max_entries is not None and len(self._entries) > self._max_entries)
            or (self._max_bytes is not None and self._bytes > self._max_bytes)
        ):
            key, entry = self._entries.popitem(last=False)
            self._bytes -= len(entry[0])
            evicted.append(key)
        return evicted

    # -- contract ------------------------------------------------------------

    def load(self, key: str) -> Record | None:
        self._tally()
        with self._lock:
            entry = self._live(key, self._clock())
        return None if entry is None else Record(entry[0], entry[1])

    def load_and_touch(self, key: str, ttl: int | None) -> Record | None:
        self._tally()
        with self._lock:
            now = self._clock()
            entry = self._live(key, now)
            if entry is None:
                return None
            self._entries[key] = (entry[0], entry[1], self._expires(ttl, now))
        return Record(entry[0], entry[1])

    def save(self, key: str, data: bytes, ttl: int | None, expect: Any = ANY) -> SaveResult:
        self._tally()
        data = bytes(data)
        with self._lock:
            now = self._clock()
            entry = self._live(key, now)
            if expect is not ANY:
                current = None if entry is None else entry[1]
                if current != expect:
                    return SaveResult(False, current=None if entry is None else Record(entry[0], entry[1]))
            version = next(self._versions)
            self._drop(key)
            self._entries[key] = (data, version, self._expires(ttl, now))
            self._bytes += len(data)
            self._sweep(now)
            evicted = self._evict()
        if self._on_evict is not None:
            for k in evicted:
                self._on_evict(k)
        return SaveResult(True, version=version)

    def touch(self, key: str, ttl: int | None) -> bool:
        self._tally()
        with self._lock:
            now = self._clock()
            entry = self._live(key, now)
            if entry is None:
                return False
            self._entries[key] = (entry[0], entry[1], self._expires(ttl, now))
        return True

    def delete(self, key: str, expect: Any = ANY) -> bool:
        self._tally()
        with self._lock:
            entry = self._live(key, self._clock())
            if entry is None or (expect is not ANY and entry[1] != expect):
                return False
            self._drop(key)
        return True

    def close(self) -> None:
        """Nothing to release; the data stays (other users may share this store)."""

    # -- session locks (LockingStore) -----------------------------------------------

    def lock(self, key: str, token: str, expiry: float, load_ttl: Any = NO_LOAD) -> tuple[bool, Record | None]:
        with self._lock:
            now = self._clock()
            held = self._locks.get(key)
            if held is not None and held[1] > now:
                self._tally()
                return False, None
            self._locks[key] = (token, now + expiry)
        if load_ttl is NO_LOAD:
            self._tally()
            return True, None
        return True, self.load_and_touch(key, load_ttl)

    def renew(self, key: str, token: str, expiry: float) -> bool:
        self._tally()
        with self._lock:
            now = self._clock()
            held = self._locks.get(key)
            if held is None or held[0] != token or held[1] <= now:
                return False
            self._locks[key] = (token, now + expiry)
            return True

    def unlock(self, key: str, token: str) -> bool:
        self._tally()
        with self._lock:
            held = self._locks.get(key)
            if held is None or held[0] != token:
                return False
            del self._locks[key]
            return held[1] > self._clock()

    def save_and_unlock(self, key: str, data: bytes, ttl: int | None, expect: Any, token: str) -> SaveResult:
        result = self.save(key, data, ttl, expect)
        with self._lock:
            held = self._locks.get(key)
            if held is not None and held[0] == token:
                del self._locks[key]
        return result

    # -- index (IndexStore) ---------------------------------------------------------

    def index_add(self, key: str, index_keys: Sequence[str], ttl: int | None) -> None:
        self._tally()
        with self._lock:
            now = self._clock()
            until = self._expires(ttl, now)
            names, expires = self._reverse.pop(key, (set(), until))
            names.update(index_keys)
            self._reverse[key] = (names, _later(expires, until))
            for ix in index_keys:
                entries = self._forward.setdefault(ix, {})
                entries[key] = _later(entries.get(key, until), until)
            self._sweep_index(now)

    def index_find(self, index_key: str) -> list[str]:
        self._tally()
        with self._lock:
            now = self._clock()
            entries = self._forward.get(index_key, {})
            return [key for key, until in entries.items()
                    if (until is None or until > now) and self._live(key, now) is not None]

    def index_drop(self, key: str) -> int:
        self._tally()
        with self._lock:
            names, _ = self._reverse.pop(key, (set(), None))
            for ix in names:
                self._unlink(ix, key)
        return len(names)

    def _unlink(self, ix: str, key: str) -> None:
        entries = self._forward.get(ix)
        if entries is not None:
            entries.pop(key, None)
            if not entries:
                del self._forward[ix]

    def _sweep_index(self, now: float) -> None:
        """Drop a bounded number of aged-out reverse records (and their entries), cold end first."""
        for key in list(itertools.islice(self._reverse, _SWEEP_BATCH)):
            names, until = self._reverse[key]
            if until is not None and until <= now:
                del self._reverse[key]
                for ix in names:
                    entries = self._forward.get(ix)
                    expiry = None if entries is None else entries.get(key, now)
                    if expiry is not None and expiry <= now:
                        self._unlink(ix, key)

    # -- invalidation feed (PushFeed) ------------------------------------------------

    def feed_publish(self, channel: str, message: bytes) -> None:
        """Hand ``message`` to every subscriber of ``channel``, in this thread."""
        self._tally()
        with self._lock:
            subscribers = list(self._channels.get(channel, ()))
        for subscription in subscribers:
            try:  # in a context of its own: the subscriber's store calls are not the publisher's
                contextvars.Context().run(subscription.deliver, bytes(message))
            except Exception:  # one broken subscriber must not stop the others
                _log.exception("sessionstore: invalidation subscriber failed")

    def feed_subscribe(self, channel: str, deliver: Callable[[bytes], None],
                       lost: Callable[[], None]) -> "_MemorySubscription":
        subscription = _MemorySubscription(self, channel, deliver)
        with self._lock:
            self._channels.setdefault(channel, []).append(subscription)
        return subscription

    def _unsubscribe(self, subscription: "_MemorySubscription") -> None:
        with self._lock:
            subscribers = self._channels.get(subscription.channel, [])
            if subscription in subscribers:
                subscribers.remove(subscription)

    # -- introspection (tests, sticky cache accounting) ------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Every key held now (expired ones included until they are swept)."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Total payload bytes held."""
        return self._bytes

    def ttl(self, key: str) -> float | None:
        """Seconds left for ``key`` (``None``: no expiry or absent)."""
        with self._lock:
            entry = self._live(key, self._clock())
        if entry is None or entry[2] is None:
            return None
        return entry[2] - self._clock()


def _later(a: float | None, b: float | None) -> float | None:
    """The later of two expiries (``None``: never)."""
    return None if a is None or b is None else max(a, b)


class _MemorySubscription:
    __slots__ = ("store", "channel", "deliver")

    def __init__(self, store: MemoryStore, channel: str, deliver: Callable[[bytes], None]) -> None:
        self.store = store
        self.channel = channel
        self.deliver = deliver

    def close(self) -> None:
        self.store._unsubscribe(self)

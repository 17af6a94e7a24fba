"""Sticky mode's store: this node's memory holds the primary copy, the shared store a backup.

:class:`StickyStore` follows the store contract, so the manager treats it
like any store. Reads are served from the local cache (bounded LRU, expiry
honoured) and cost no store command; a local miss (a restarted process, an
evicted entry) falls back to the backup. Writes go to the local cache and
then to the backup through a :class:`~sessionstore.backup.BackupWriter`
(``backup="sync"`` or ``"async"``).

The backup lives ``BACKUP_SLACK`` longer than the session's idle timeout and
is re-touched only when it would otherwise lapse before the primary copy,
so a read-only request costs a store command only about once per quarter
of the idle timeout per session. After a node restart, a session may be
loaded from its backup up to that slack after it went idle.

What is lost when the node dies: nothing acknowledged with ``backup="sync"``
(unless the store was down at the time and the queued backup had not yet
landed); with ``backup="async"``, the writes still queued at the moment of
death.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

from .backup import BackupWriter
from .settings import Settings
from .stores.base import ANY, Record, SaveResult, Store, is_companion
from .stores.memory import MemoryStore

__all__ = ["StickyStore", "BACKUP_SLACK"]

#: The backup outlives the primary by this fraction of the idle timeout.
BACKUP_SLACK = 0.25


class StickyStore:
    """A local :class:`MemoryStore` in front of a shared store used as backup."""

    def __init__(self, remote: Store, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        single_copy = getattr(remote, "single_copy", None)  # the primary is here: one store copy is enough
        self.remote = single_copy() if single_copy is not None else remote
        self.clock = clock
        self.local = MemoryStore(
            clock=clock,
            max_entries=settings.local_cache_sessions,
            max_bytes=settings.local_cache_bytes,
            on_evict=self._forget,
            counted=False,
        )
        self.backup = BackupWriter(self.remote, asynchronous=settings.backup == "async")
        self._deadlines: dict[str, float] = {}  # key -> when its backup expires
        self._lock = threading.Lock()

    # -- reads -------------------------------------------------------------------------------

    def fetch(self, key: str, ttl: int | None) -> tuple[Record | None, str]:
        """The session, local copy first; and where it came from (``local`` or ``store``)."""
        record = self.local.load_and_touch(key, ttl)
        if record is not None:
            self._refresh_backup(key, ttl, record.data)
            return record, "local"
        stored = self.remote.load_and_touch(key, _backup_ttl(ttl))
        if stored is None:
            return None, "store"
        self._set_deadline(key, ttl)
        result = self.local.save(key, stored.data, ttl, expect=None)
        if not result.ok:  # another request put a (newer) copy here meanwhile: that one is primary
            return result.current, "local"
        return Record(stored.data, result.version, stored.relocated), "store"

    def keep_alive(self, key: str, ttl: int | None) -> None:
        """A request uses the session from memory: slide the local expiry, mind the backup's."""
        record = self.local.load_and_touch(key, ttl)
        if record is not None:
            self._refresh_backup(key, ttl, record.data)

    def load_backup(self, key: str, ttl: int | None) -> Record | None:
        """Another node's session, straight from the shared store (failover)."""
        return self.remote.load_and_touch(key, _backup_ttl(ttl))

    def load(self, key: str) -> Record | None:
        if is_companion(key):
            return self.remote.load(key)
        return self.local.load(key) or self.remote.load(key)

    def load_and_touch(self, key: str, ttl: int | None) -> Record | None:
        return self.fetch(key, ttl)[0]

    # -- writes ------------------------------------------------------------------------------

    def save(self, key: str, data: bytes, ttl: int | None, expect: Any = ANY) -> SaveResult:
        if is_companion(key):  # tombstones: the store only, through the writer (never blocks)
            self.backup.save(key, data, ttl)
            return SaveResult(True, version=None)
        result = self.local.save(key, data, ttl, expect)
        if result.ok:
            self._set_deadline(key, ttl)
            self.backup.save(key, data, _backup_ttl(ttl))
        return result

    def touch(self, key: str, ttl: int | None) -> bool:
        record = self.local.load_and_touch(key, ttl)
        if record is not None:
            self._set_deadline(key, ttl)
            self.backup.touch(key, _backup_ttl(ttl), record.data)
        return record is not None

    def delete(self, key: str, expect: Any = ANY) -> bool:
        found = self.local.delete(key, expect)
        if found or expect is ANY:
            self._forget(key)
            self.backup.delete(key)
        return found

    def close(self) -> None:
        self.backup.close()
        self.remote.close()

    # -- backup expiry ---------------------------------------------------------------------------

    def _refresh_backup(self, key: str, ttl: int | None, data: bytes) -> None:
        """Touch the backup only if it would lapse before the primary copy does.

        A backup the store lost (evicted, or its memcached node died) is
        written again from ``data``, the primary copy.
        """
        if ttl is None:
            return
        now = self.clock()
        deadline = self._deadlines.get(key)
        if deadline is None or deadline < now + ttl:
            self._set_deadline(key, ttl, now)
            self.backup.touch(key, _backup_ttl(ttl), data)

    def _set_deadline(self, key: str, ttl: int | None, now: float | None = None) -> None:
        if ttl is None:
            self._deadlines.pop(key, None)
            return
        with self._lock:
            self._deadlines[key] = (self.clock() if now is None else now) + _backup_ttl(ttl)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._deadlines.pop(key, None)


def _backup_ttl(ttl: int | None) -> int | None:
    return None if ttl is None else ttl + max(1, math.ceil(ttl * BACKUP_SLACK))

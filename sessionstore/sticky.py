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

Sessions destroyed elsewhere (single sign-out, ``manager.invalidate`` from
another node, a failover that moved a session to another node) reach this
node through the invalidation feed (:mod:`sessionstore.invalidation`), which
calls :meth:`StickyStore.drop_session`. A dropped key is remembered for
``DESTROYED_MEMORY`` seconds: it is never loaded, saved, touched or backed
up again on this node, whatever request was in flight when the message came
(checked before each write and again after it, so a write racing with the
drop is taken back). When the feed may have lost messages (a reconnection,
a reset log), :meth:`StickyStore.suspect_all` makes every session held
here be checked against the store once, on its next use.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Sequence

from .backup import BackupWriter
from .errors import CorruptPayload, StoreError
from .settings import Settings
from .stores.base import ANY, INDEX_SUFFIX, Record, SaveResult, Store, companion_key, is_companion
from .stores.memory import MemoryStore
from .tombstones import read_stone

__all__ = ["StickyStore", "BACKUP_SLACK", "DESTROYED_MEMORY"]

_log = logging.getLogger("sessionstore")

#: The backup outlives the primary by this fraction of the idle timeout.
BACKUP_SLACK = 0.25
#: Seconds a node remembers a session destroyed elsewhere (longer than any request).
DESTROYED_MEMORY = 3600.0
#: Tombstone states meaning "this id is over" (a suspect local copy is dropped).
_FINAL_STATES = ("invalidated", "expired", "replaced")


class StickyStore:
    """A local :class:`MemoryStore` in front of a shared store used as backup."""

    def __init__(self, remote: Store, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        #: The store as configured: index entries, the invalidation feed, destruction.
        self.shared = remote
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
        self.backup = BackupWriter(self.remote, asynchronous=settings.backup == "async",
                                   index_store=remote, gate=self._writable)
        self._deadlines: dict[str, float] = {}  # key -> when its backup expires
        self._lock = threading.Lock()
        self._destroyed: dict[str, float] = {}  # session key -> until when it is remembered
        self._suspects: set[str] = set()  # keys to check against the store on next use

    # -- destroyed elsewhere ----------------------------------------------------------

    def is_destroyed(self, key: str) -> bool:
        """Whether session ``key`` was destroyed (here or, through the feed, elsewhere)."""
        until = self._destroyed.get(key)
        return until is not None and until > self.clock()

    def _writable(self, key: str) -> bool:
        """The backup writer's gate: nothing of a destroyed session is written any more."""
        return not self.is_destroyed(_session_of(key))

    def _mark_destroyed(self, key: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._destroyed) >= 10_000:
                for old in [k for k, until in self._destroyed.items() if until <= now]:
                    del self._destroyed[old]
            self._destroyed[key] = now + DESTROYED_MEMORY
            self._suspects.discard(key)

    def drop_session(self, key: str, *, everywhere: bool) -> bool:
        """Forget session ``key`` on this node for good: local copy, queued writes, and any later write.

        ``everywhere=True`` (the node destroying it): the store copy is
        deleted now, synchronously (raises ``StoreUnavailable``); returns
        whether a copy existed here or in the store. ``everywhere=False``
        (told by the feed): the store copy is deleted again only if this node
        held the session or had writes queued for it (one of them may have
        landed after the destroyer's delete); returns whether it held it.
        """
        self._mark_destroyed(key)  # first: from now on no write of it passes the gate
        held = self.local.delete(key)
        queued = self.backup.discard([key, companion_key(key, "t"), companion_key(key, INDEX_SUFFIX)])
        self._forget(key)
        if everywhere:
            return self.remote.delete(key) or held
        if held or queued:
            try:
                self.remote.delete(key)
            except StoreError as exc:  # the destroyer deleted it; only a racing write could be left
                _log.warning("sessionstore: could not delete a destroyed session's backup again: %s", exc)
        return held or bool(queued)

    def suspect_all(self) -> int:
        """Invalidations may have been missed: check each session held here on its next use."""
        keys = self.local.keys()
        with self._lock:
            self._suspects.update(keys)
        return len(keys)

    def _still_valid(self, key: str, ttl: int | None) -> bool:
        """A suspect local copy: is the session still alive in the store?

        Its backup there says yes (and is touched). A missing backup is not
        proof (the store may have lost it): only a tombstone saying the id is
        over (invalidated, expired, replaced) condemns the local copy. 1-2
        commands, once per suspect session.
        """
        with self._lock:
            if key not in self._suspects:
                return True
            self._suspects.discard(key)
        try:
            if self.remote.load_and_touch(key, _backup_ttl(ttl)) is not None:
                return True
            stone = self.shared.load(companion_key(key, "t"))
            state = read_stone(stone.data).state if stone is not None else None
        except CorruptPayload:  # an unreadable backup or tombstone condemns nothing
            state = None
        if state in _FINAL_STATES:
            self.drop_session(key, everywhere=False)
            return False
        return True

    # -- reads -------------------------------------------------------------------------------

    def fetch(self, key: str, ttl: int | None) -> tuple[Record | None, str]:
        """The session, local copy first; and where it came from (``local`` or ``store``)."""
        if self.is_destroyed(key):
            return None, "store"
        record = self.local.load_and_touch(key, ttl)
        if record is not None and (not self._suspects or self._still_valid(key, ttl)):
            self._refresh_backup(key, ttl, record.data)
            return record, "local"
        if record is not None:
            return None, "store"
        stored = self.remote.load_and_touch(key, _backup_ttl(ttl))
        if stored is None:
            return None, "store"
        self._set_deadline(key, ttl)
        result = self.local.save(key, stored.data, ttl, expect=None)
        if self.is_destroyed(key):  # destroyed while it was being loaded: never keep it
            self.local.delete(key)
            return None, "store"
        if not result.ok:  # another request put a (newer) copy here meanwhile: that one is primary
            return result.current, "local"
        return Record(stored.data, result.version, stored.relocated), "store"

    def keep_alive(self, key: str, ttl: int | None) -> None:
        """A request uses the session from memory: slide the local expiry, mind the backup's."""
        if self.is_destroyed(key):
            return
        record = self.local.load_and_touch(key, ttl)
        if record is not None:
            self._refresh_backup(key, ttl, record.data)

    def load_backup(self, key: str, ttl: int | None) -> Record | None:
        """Another node's session, straight from the shared store (failover)."""
        if self.is_destroyed(key):
            return None
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
        if self.is_destroyed(key):  # destroyed elsewhere: an in-flight request must not bring it back
            return SaveResult(False, current=None)
        result = self.local.save(key, data, ttl, expect)
        if result.ok and self.is_destroyed(key):  # the drop came in between
            self.local.delete(key)
            return SaveResult(False, current=None)
        if result.ok:
            self._set_deadline(key, ttl)
            self.backup.save(key, data, _backup_ttl(ttl))
        return result

    def touch(self, key: str, ttl: int | None) -> bool:
        if self.is_destroyed(key):
            return False
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

    # -- index: entries go through the backup writer (after the session write queued before) --

    def index_add(self, key: str, index_keys: Sequence[str], ttl: int | None) -> None:
        self.backup.index(key, index_keys, ttl)

    def index_find(self, index_key: str) -> list[str]:
        return self.shared.index_find(index_key)  # type: ignore[attr-defined]

    def index_drop(self, key: str) -> int:
        """Queued like a backup write: the count is not known here (0)."""
        self.backup.unindex(key)
        return 0

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
            self._suspects.discard(key)


def _session_of(key: str) -> str:
    """The session key a (companion) key belongs to: ``<prefix>{<id>}``."""
    if is_companion(key):
        return key[: key.index("}:") + 1]
    return key


def _backup_ttl(ttl: int | None) -> int | None:
    return None if ttl is None else ttl + max(1, math.ceil(ttl * BACKUP_SLACK))

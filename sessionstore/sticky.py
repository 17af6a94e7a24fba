"""Sticky mode's store: the node holds the primary copy, the shared store a backup.

:class:`StickyStore` follows the store contract, so the manager treats it
like any store. The primary copies live in a node copy, a
:class:`~sessionstore.stores.local.LocalStore` that every worker process and
thread of the node shares (one ``node_id`` on one host): a request may land
on any worker of its node and finds the same session, saved conditionally
and merged per attribute like in non-sticky mode. Reads are served from the
node copy and cost no store command; a miss (the copy was evicted, the host
rebooted) falls back to the backup. Writes go to the node copy, then to the
backup through a :class:`~sessionstore.backup.BackupWriter`
(``backup="sync"`` or ``"async"``).

Backups never regress: whichever worker writes a session's backup writes
the node copy's *current* bytes, one worker at a time per session (a short
lease in the node copy), and skips it when the backup already holds that
version. An older write queued in a slow or killed worker can therefore
never overwrite a newer backup.

The backup lives ``BACKUP_SLACK`` longer than the session's idle timeout and
is re-touched only when it would otherwise lapse before the primary copy
(the deadline is kept in the node copy, so the workers share it): a
read-only request costs a store command about once per quarter of the idle
timeout per session and node.

What is lost when the node dies: nothing acknowledged with ``backup="sync"``
(unless the store was down at the time); with ``backup="async"``, the writes
still queued at the moment of death. A worker that dies loses nothing: the
node copy is outside it.

An id that is over (logged out, rotated, moved to another node, destroyed
elsewhere through the invalidation feed of :mod:`sessionstore.invalidation`)
is marked gone in the node copy for ``DESTROYED_MEMORY`` seconds: no worker
of the node loads, saves, touches or backs it up again, and its backup is
deleted from the store at once, whatever ``backup`` is, so no node can load
it from there either. When the feed may have lost messages,
:meth:`StickyStore.suspect_all` makes every session held here be checked
against the store once, on its next use in this process.
"""

from __future__ import annotations

import logging
import math
import secrets
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .backup import BackupWriter
from .errors import CorruptPayload, StoreError, StoreUnavailable
from .settings import Settings
from .stores.base import ANY, INDEX_SUFFIX, NO_LOAD, Record, SaveResult, Store, companion_key, is_companion
from .stores.local import LocalStore, default_directory
from .tombstones import read_stone

__all__ = ["StickyStore", "BACKUP_SLACK", "DESTROYED_MEMORY", "node_directory"]

_log = logging.getLogger("sessionstore")

#: The backup outlives the primary by this fraction of the idle timeout.
BACKUP_SLACK = 0.25
#: Seconds a node remembers that an id is over (longer than any request).
DESTROYED_MEMORY = 3600.0
#: Tombstone states meaning "this id is over" (a suspect local copy is dropped).
_FINAL_STATES = ("invalidated", "expired", "replaced")
#: Seconds a worker may hold a session's backup lease (a killed worker's lease frees itself).
_LEASE_EXPIRY = 5.0
# node-copy companions: the id is over; the backup's deadline and the version it holds; the lease;
# the takeover turn of another node's id, and the id it was taken over under
_GONE, _BACKED, _LEASE, _TURN, _MOVED = "gone", "bk", "bkl", "fo", "moved"
#: Seconds a failover may hold its turn (a killed worker's turn frees itself), and wait for one.
_TURN_EXPIRY, _TURN_WAIT = 10.0, 10.0
#: Seconds the old id of a session taken over leads to its new id (the parallel requests of
#: one page); later, the old id loads nothing here either.
_MOVED_TTL = 10
#: Seconds between two "a worker of this node is listening to the feed" beats.
LISTENING_BEAT = 0.5
_LISTENING_KEY = "sessionstore:{node}:listening"
_BACKED_FORMAT = struct.Struct("<dQ")


def node_directory(settings: Settings) -> Path:
    """Where this node keeps its node copy: ``node_dir``, or one directory per application and node id."""
    if settings.node_dir:
        return Path(settings.node_dir)
    return default_directory(*settings.app_identity("node", settings.node_id or ""))


class StickyStore:
    """The node copy in front of a shared store used as backup."""

    def __init__(self, remote: Store, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        #: The store as configured: index entries, the invalidation feed, destruction.
        self.shared = remote
        single_copy = getattr(remote, "single_copy", None)  # the primary is here: one store copy is enough
        self.remote = single_copy() if single_copy is not None else remote
        self.clock = clock
        #: The node copy, shared by every worker process of this node.
        self.local = LocalStore(node_directory(settings), clock=clock, max_sessions=settings.local_cache_sessions,
                                max_bytes=settings.local_cache_bytes, counted=False)
        self.backup = BackupWriter(self.remote, asynchronous=settings.backup == "async",
                                   index_store=remote, gate=self._writable, ledger=_Ledger(self.local, clock))
        self._lock = threading.Lock()
        self._suspects: set[str] = set()  # keys to check against the store on next use (this process)
        self._deadlines: dict[str, float] = {}  # backup deadlines this process saw in the ledger

    # -- ids that are over ----------------------------------------------------------------

    def is_destroyed(self, key: str) -> bool:
        """Whether session ``key`` is over on this node (logged out, rotated, moved, destroyed elsewhere)."""
        return self.local.load(companion_key(key, _GONE)) is not None

    def _writable(self, key: str) -> bool:
        """The backup writer's gate: nothing of a session that is over is written any more."""
        return not self.is_destroyed(_session_of(key))

    def _mark_destroyed(self, key: str) -> None:
        self.local.save(companion_key(key, _GONE), b"", math.ceil(DESTROYED_MEMORY))
        with self._lock:
            self._suspects.discard(key)

    def drop_session(self, key: str, *, everywhere: bool) -> bool:
        """Forget session ``key`` on this node for good: node copy, queued writes, and any later write.

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
        if everywhere:
            return self.remote.delete(key) or held
        if held or queued:
            try:
                self.remote.delete(key)
            except StoreError as exc:  # the destroyer deleted it; only a racing write could be left
                _log.warning("sessionstore: could not delete a destroyed session's backup again: %s", exc)
        return held or bool(queued)

    def listen(self, stop: threading.Event) -> bool:
        """This process listens to the feed from now on: beat until ``stop``; whether the node had a gap.

        If no worker of the node was listening a moment ago (the whole node
        was down), messages may have been missed while the node copy
        survived: the caller then suspects every session held here.
        """
        gap = self.local.load(_LISTENING_KEY) is None
        self._beat()
        threading.Thread(target=self._beating, args=(stop,), name="sessionstore-listening", daemon=True).start()
        return gap

    def _beat(self) -> None:
        self.local.save(_LISTENING_KEY, b"", max(1, math.ceil(3 * LISTENING_BEAT)))

    def _beating(self, stop: threading.Event) -> None:
        while not stop.wait(LISTENING_BEAT):
            try:
                self._beat()
            except Exception:  # the node copy went away (tests): stop quietly
                return

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
        """The session, node copy first; and where it came from (``local`` or ``store``).

        A live node copy is never one of an id that is over: the id is marked
        gone before its copy is deleted, and writes check the mark.
        """
        record = self.local.load_and_touch(key, ttl)
        if record is not None and (not self._suspects or self._still_valid(key, ttl)):
            self._refresh_backup(key, ttl, record)
            return record, "local"
        if record is not None or self.is_destroyed(key):
            return None, "store"
        stored = self.remote.load_and_touch(key, _backup_ttl(ttl))
        if stored is None:
            return None, "store"
        result = self.local.save(key, stored.data, ttl, expect=None)
        if self.is_destroyed(key):  # over while it was being loaded: never keep it
            self.local.delete(key)
            return None, "store"
        if not result.ok:  # another request put a (newer) copy here meanwhile: that one is primary
            return result.current, "local"
        self.backup.ledger.backed(key, result.version, _backup_ttl(ttl))  # type: ignore[union-attr]
        return Record(stored.data, result.version, stored.relocated), "store"

    @contextmanager
    def taking_over(self, key: str) -> Iterator[str | None]:
        """Hold this node's turn to take over another node's session ``key`` (one worker at a time).

        Yields the id a worker of this node already took it over under (a
        parallel request of the same page got here first), or ``None``: then
        the caller takes it over and says so with :meth:`taken_over`.
        """
        with held(self.local, companion_key(key, _TURN), _TURN_EXPIRY, _TURN_WAIT, "taking this session over"):
            moved = self.local.load(companion_key(key, _MOVED))
            yield None if moved is None else moved.data.decode()

    def taken_over(self, key: str, new_id: str) -> None:
        """Session ``key`` now lives here as ``new_id``: later requests with the old id get that one."""
        self.local.save(companion_key(key, _MOVED), new_id.encode(), _MOVED_TTL)

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
        if self.is_destroyed(key):  # over: an in-flight request must not bring it back
            return SaveResult(False, current=None)
        result = self.local.save(key, data, ttl, expect)
        if result.ok and self.is_destroyed(key):  # it ended in between
            self.local.delete(key)
            return SaveResult(False, current=None)
        if result.ok:
            self.backup.save(key, data, _backup_ttl(ttl), version=result.version)
        return result

    def touch(self, key: str, ttl: int | None) -> bool:
        if self.is_destroyed(key):
            return False
        record = self.local.load_and_touch(key, ttl)
        if record is not None:
            self.backup.ledger.extend(key, _backup_ttl(ttl))  # type: ignore[union-attr]
            self.backup.touch(key, _backup_ttl(ttl), record.data)
        return record is not None

    def delete(self, key: str, expect: Any = ANY) -> bool:
        """The id is over (rotated, moved, logged out, expired): everywhere, at once.

        The backup is deleted synchronously even with ``backup="async"``: no
        node may load an old id from a backup whose delete is still queued.
        """
        if expect is not ANY and self.local.load(key) is None:
            return False
        self._mark_destroyed(key)
        found = self.local.delete(key, expect)
        self.backup.discard([key])
        try:
            self.remote.delete(key)
        except StoreError as exc:  # no other node can load it while the store is down; retried
            _log.warning("sessionstore: could not delete an old session id's backup now (%s); queued", exc)
            self.backup.delete(key)
        return found

    # -- session locks: held in the node copy (every request of a session comes to its node) ----

    def lock(self, key: str, token: str, expiry: float, load_ttl: Any = NO_LOAD) -> tuple[bool, Record | None]:
        acquired, _ = self.local.lock(companion_key(key, "lock"), token, expiry)
        if not acquired or load_ttl is NO_LOAD:
            return acquired, None
        return True, self.fetch(key, load_ttl)[0]

    def renew(self, key: str, token: str, expiry: float) -> bool:
        return self.local.renew(companion_key(key, "lock"), token, expiry)

    def unlock(self, key: str, token: str) -> bool:
        return self.local.unlock(companion_key(key, "lock"), token)

    def save_and_unlock(self, key: str, data: bytes, ttl: int | None, expect: Any, token: str) -> SaveResult:
        try:
            return self.save(key, data, ttl, expect)
        finally:
            self.unlock(key, token)

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
        self.local.close()

    # -- backup expiry ---------------------------------------------------------------------------

    def _refresh_backup(self, key: str, ttl: int | None, record: Record) -> None:
        """Touch the backup only if it would lapse before the primary copy does.

        The deadline is the node's (in the ledger); this process remembers
        what it last saw there, so a read looks at the ledger only when the
        deadline may be near. A backup the store lost (evicted, or its
        memcached node died) is written again from the node copy.
        """
        if ttl is None:
            return
        now = self.clock()
        if self._deadlines.get(key, 0.0) >= now + ttl:
            return
        ledger: _Ledger = self.backup.ledger  # type: ignore[assignment]
        deadline = ledger.deadline(key)
        if deadline is None or deadline < now + ttl:
            ledger.extend(key, _backup_ttl(ttl))
            self.backup.touch(key, _backup_ttl(ttl), record.data)
            deadline = now + (_backup_ttl(ttl) or 0)
        if len(self._deadlines) >= 100_000:
            self._deadlines.clear()
        self._deadlines[key] = deadline


class _Ledger:
    """What the node copy knows about each session's backup (shared by the node's workers).

    Per session: until when the backup lives and which node-copy version it
    holds; and a lease so that one worker at a time writes a session's
    backup, always the node copy's current bytes.
    """

    def __init__(self, local: LocalStore, clock: Callable[[], float]) -> None:
        self.local = local
        self.clock = clock

    def current(self, key: str) -> Record | None:
        """The node copy's record of session ``key`` (what its backup must hold)."""
        return self.local.load(key)

    def _read(self, key: str) -> tuple[float, int] | None:
        record = self.local.load(companion_key(key, _BACKED))
        if record is None or len(record.data) != _BACKED_FORMAT.size:
            return None
        return _BACKED_FORMAT.unpack(record.data)

    def deadline(self, key: str) -> float | None:
        found = self._read(key)
        return None if found is None else found[0]

    def holds_newer(self, key: str, version: Any) -> bool:
        """Whether the backup already holds node-copy ``version`` or a later one."""
        found = self._read(key)
        return found is not None and isinstance(version, int) and found[1] >= version

    def backed(self, key: str, version: Any, ttl: int | None) -> None:
        """The backup now holds ``version`` and lives ``ttl`` seconds."""
        self._write(key, ttl, int(version) if isinstance(version, int) else 0)

    def extend(self, key: str, ttl: int | None) -> None:
        """The backup's expiry was (or is about to be) slid to ``ttl`` seconds from now."""
        found = self._read(key)
        self._write(key, ttl, 0 if found is None else found[1])

    def _write(self, key: str, ttl: int | None, version: int) -> None:
        deadline = float("inf") if ttl is None else self.clock() + ttl
        self.local.save(companion_key(key, _BACKED), _BACKED_FORMAT.pack(deadline, version),
                        None if ttl is None else ttl)

    @contextmanager
    def lease(self, key: str, wait: float) -> Iterator[None]:
        """Hold session ``key``'s backup lease (waiting up to ``wait`` s for another worker)."""
        with held(self.local, companion_key(key, _LEASE), _LEASE_EXPIRY, wait, "writing this session's backup"):
            yield


@contextmanager
def held(local: LocalStore, lock_key: str, expiry: float, wait: float, doing: str) -> Iterator[None]:
    """Hold the node-copy lock ``lock_key`` (it frees itself after ``expiry`` s if its worker dies),
    waiting up to ``wait`` s for the worker of this node that is ``doing`` something with it."""
    token, deadline = secrets.token_hex(8), time.monotonic() + wait
    while not local.lock(lock_key, token, expiry)[0]:
        if time.monotonic() >= deadline:
            raise StoreUnavailable(f"another worker of this node is {doing}")
        time.sleep(0.001)
    try:
        yield
    finally:
        local.unlock(lock_key, token)


def _session_of(key: str) -> str:
    """The session key a (companion) key belongs to: ``<prefix>{<id>}``."""
    if is_companion(key):
        return key[: key.index("}:") + 1]
    return key


def _backup_ttl(ttl: int | None) -> int | None:
    return None if ttl is None else ttl + max(1, math.ceil(ttl * BACKUP_SLACK))

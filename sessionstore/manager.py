"""The session manager: loads, saves, merges and destroys sessions.

It sits between the middleware (which knows HTTP) and the store (which knows
bytes). One manager serves every request of an application; per-request
bookkeeping lives on the :class:`~sessionstore.session.Session` object and
its :class:`~sessionstore.debug.RequestRecord`.

Saves are conditional on the version the request loaded. When another
request saved the session meanwhile, the manager merges attribute by
attribute (see :func:`merge`) instead of overwriting: attributes the other
request changed are kept, this request's changes are applied on top, and an
attribute both changed is a conflict (``on_conflict``).

In sticky mode the manager's store is a :class:`~sessionstore.sticky.StickyStore`
(this node's copy first, shared by all of its worker processes; the shared
store as backup); the manager adds the route logic (a session id carrying
another node's route is a failover, one takeover per id on the node).
Requests load and save as in non-sticky mode: each its own copy, saves
conditional on the node copy, merged or locked.
Sessions destroyed from another node, or moved away by a failover, reach
this node through the invalidation feed (:mod:`sessionstore.invalidation`).

The index for single sign-out (``session.index``, :meth:`SessionManager.find_by_index`,
:meth:`SessionManager.invalidate_by_index`) is described in :mod:`sessionstore.index`.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import ids
from .debug import RequestRecord, log_id
from .errors import ConfigError, ConflictError, CorruptPayload, LockTimeout, SessionTooLarge, StoreUnavailable
from .encryption import Sealer
from .events import Listeners, SessionEvent
from .payload import NO_LINEAGE, Lineage, Meta, Payload, decode, encode
from .serializers import Serializer, get_serializer
from .session import Changes, Session, SessionState
from .settings import Settings
from .signing import CookieSigner, Verdict
from .stores import open_store
from .locking import LockPolicy, LockRenewer
from .metrics import Metrics, TimedStore
from .stores.base import NO_LOAD, LockingStore, Record, Store
from .timeouts import IdleTimeouts
from .tombstones import Tombstones
from .index import SessionIndex, entry_ttl
from .invalidation import InvalidationFeed, feed_kind
from .node_lease import NodeLease

__all__ = ["SessionManager", "CommitOutcome", "merge"]

_log = logging.getLogger("sessionstore")
_MAX_MERGE_ROUNDS = 64


@dataclass(slots=True)
class CommitOutcome:
    """What the middleware must do with the cookie after a commit."""

    #: ``"set"`` (send ``session_id``), ``"delete"`` or ``None`` (leave it).
    cookie: str | None = None
    session_id: str | None = None


class SessionManager:
    """Loads and saves sessions for one application (``app.manager``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] | None = None,
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or time.time
        if store is None:
            store = open_store(settings.store, clock=self.clock, app=settings.app_identity())
        self.metrics = Metrics()
        self._sticky: Any = None
        #: The shared store itself (in sticky mode: past this node's memory and backup writer).
        self._shared: Any = TimedStore(store, self.metrics)
        if settings.sticky:
            from .sticky import StickyStore

            store = self._sticky = StickyStore(store, settings, clock=self.clock)
        self.store: Store = TimedStore(store, self.metrics)  # type: ignore[assignment]
        self.serializer: Serializer = get_serializer(settings.serializer, settings.secret_keys)
        self._readers: dict[str, Serializer] = {self.serializer.name: self.serializer}
        self.signer = CookieSigner(settings.secret_keys)
        self._sealer = Sealer(settings.encryption_keys) if settings.encryption_keys else None
        self.listeners = Listeners()
        self.node_id = settings.node_id if settings.sticky else None
        self._prefix = settings.key_prefix
        self.tombstones = Tombstones(self.store, self.clock)
        self._timeouts = IdleTimeouts(settings.max_inactive)
        #: Tombstones saying an id is over, written straight to the shared store (in sticky mode the
        #: id is gone from the node copy first, and its backup writer no longer writes anything of it).
        self._final_tombstones = Tombstones(self._shared, self.clock)
        self.index = SessionIndex(self._shared, self._prefix)
        self.feed: InvalidationFeed | None = None
        self.lease: NodeLease | None = None
        if self._sticky is not None:
            self._start_feed()
            self._start_lease()
        self.lock_policy = LockPolicy(settings.locking)
        self._renewer: LockRenewer | None = None
        if settings.locking != "none":
            if not isinstance(self.store, LockingStore):
                raise ConfigError("locking", f"the {type(store).__name__} store cannot hold session locks")
            self._renewer = LockRenewer(store.renew, settings.lock_expiry)

    # -- public API ------------------------------------------------------------------

    def on(self, event: str, callback: Callable[[SessionEvent], None]) -> None:
        """Call ``callback(SessionEvent)`` on ``created``, ``destroyed`` or ``id_changed``."""
        self.listeners.add(event, callback)

    def load(self, session_id: str) -> Session | None:
        """The stored session ``session_id``, or ``None``. Save changes with :meth:`save`.

        Looking a session up this way does not slide its expiry.
        """
        if not ids.is_valid(session_id):
            return None
        session = Session(self, None, RequestRecord())
        try:
            stored = self.store.load(self.key(session_id))
            if stored is None or not self._adopt(session, session_id, stored):
                return None
        except CorruptPayload as exc:  # left in place, as for a request
            _log.warning("sessionstore: session %s does not decode; left in place: %s", log_id(session_id), exc)
            return None
        session._requested_id = session_id
        session._loaded = True
        return session

    def save(self, session: Session) -> None:
        """Commit ``session`` now (it stays usable; later changes are committed again).

        Raises :class:`~sessionstore.errors.ConflictError` with
        ``on_conflict="error"`` when another request changed the same attribute.
        """
        self.commit(session)

    def invalidate(self, session_id: str) -> bool:
        """Destroy the stored session ``session_id`` (from any node). True if it existed.

        In sticky mode the node holding it in memory drops it too (within a
        second, through the invalidation feed).
        """
        if not ids.is_valid(session_id):
            return False
        destroyed = self._destroy(session_id)
        self._publish([session_id], "invalidated")
        return destroyed

    def find_by_index(self, name: str, value: str) -> list[str]:
        """Ids of the live sessions that called ``session.index(name, value)`` (from any node).

        An index record or entry that does not decode is skipped (and logged), never raised:
        it names no session that could be found.
        """
        store = self._index_store()
        try:
            keys = store.index_find(self.index.key(name, value))
        except CorruptPayload as exc:
            _log.warning("sessionstore: index record for %r left in place, not searched: %s", name, exc)
            return []
        found = []
        for key in keys:
            try:
                found.append(self.index.entry(key))
            except CorruptPayload as exc:
                _log.warning("sessionstore: index entry for %r skipped: %s", name, exc)
        return found

    def invalidate_by_index(self, name: str, value: str) -> int:
        """Destroy every session found by :meth:`find_by_index`, each as :meth:`invalidate` does
        (deleted, ``invalidated`` tombstone, ``destroyed`` listeners, index entries removed).
        Returns how many sessions were destroyed."""
        found = self.find_by_index(name, value)
        destroyed = [sid for sid in found if self._destroy(sid)]
        self._publish(found, "invalidated")
        return len(destroyed)

    def _index_store(self) -> Any:
        if not self.index.enabled:
            raise ConfigError("store", f"the {type(self._shared.wrapped).__name__} store keeps no index")
        return self._shared

    def _destroy(self, session_id: str) -> bool:
        """Delete a session from everywhere (this node's memory included) and say so once."""
        key = self.key(session_id)
        if self._sticky is not None:
            existed = self._sticky.drop_session(key, everywhere=True)
        else:
            existed = self.store.delete(key)
        if self.index.enabled and (existed or self._sticky is not None):
            self._drop_index(self._shared, key)
        if existed:
            self._final_tombstones.destroyed(key, "invalidated", self._default_ttl())
            self.listeners.emit(SessionEvent("destroyed", session_id, reason="invalidated"))
        return existed

    def _publish(self, session_ids: list[str], reason: str) -> None:
        if self.feed is not None and session_ids:
            self.feed.publish(session_ids, reason)

    # -- the invalidation feed (sticky mode) ------------------------------------------------

    def _start_feed(self) -> None:
        shared = self._sticky.shared
        if feed_kind(shared) is None:
            _log.warning("sessionstore: the %s store has no invalidation feed: a session invalidated on another "
                         "node stays usable on the node holding it until it expires there", type(shared).__name__)
            return
        self.feed = InvalidationFeed(self._shared, f"{self._prefix}inv", self.node_id,  # type: ignore[arg-type]
                                     self._invalidated_elsewhere, self._feed_lost)
        self.feed.start()
        self._listening = threading.Event()
        if self._sticky.listen(self._listening):  # the whole node was down: messages may be lost
            self._feed_lost()
        # a manager dropped without close() stops listening (without blocking whoever collects it)
        weakref.finalize(self, self.feed.close, False)
        weakref.finalize(self, self._listening.set)

    def _start_lease(self) -> None:
        self.lease = NodeLease(self._shared, self._sticky.local, self._prefix, self.node_id,  # type: ignore[arg-type]
                               interval=self.settings.node_lease_interval, clock=self.clock)
        self.lease.start()
        weakref.finalize(self, self.lease.close)

    def _invalidated_elsewhere(self, session_ids: list[str], reason: str) -> None:
        """Another node destroyed (``invalidated``) or took over (``moved``) these sessions."""
        for session_id in session_ids:
            key = self.key(session_id)
            held = self._sticky.drop_session(key, everywhere=False)
            if held and reason == "invalidated":  # a write of ours may have landed after theirs
                self._final_tombstones.destroyed(key, "invalidated", self._default_ttl())

    def _feed_lost(self) -> None:
        count = self._sticky.suspect_all()
        if count:
            _log.warning("sessionstore: invalidations may have been missed; checking %d local session(s) "
                         "against the store on their next use", count)

    def _gone(self, key: str) -> bool:
        """Sticky mode: whether ``key`` was destroyed by another call (whose listeners fired)."""
        return bool(self._sticky.is_destroyed(key))

    def stats(self) -> dict[str, Any]:
        """Counters and store timings since start (see :mod:`sessionstore.metrics`)."""
        return self.metrics.snapshot()

    def close(self) -> None:
        """Flush pending work (async backups) and close store connections."""
        if self.feed is not None:
            self.feed.close()
            self._listening.set()
        if self.lease is not None:
            self.lease.close()
        if self._renewer is not None:
            self._renewer.close()
        self.store.close()

    def key(self, session_id: str) -> str:
        """Store key of a session: ``<key_prefix>{<id>}`` (a Redis Cluster hash tag)."""
        return f"{self._prefix}{{{session_id}}}"

    # -- request entry points ----------------------------------------------------------------

    def open(self, cookie: str | None, record: RequestRecord, path: str = "") -> Session:
        """A lazy session for a request on ``path`` that carried ``cookie`` (raw value or None)."""
        return Session(self, cookie, record, path)

    def release(self, session: Session) -> None:
        """The request is over: free its lock."""
        if session._lock is not None:
            self._unlock(session)

    def _load(self, session: Session) -> None:
        """First touch: verify the cookie, load from the store or start a new session."""
        record: RequestRecord = session._record
        if self.lease is not None and self.lease.collided():
            record.add("node-id-collision", node=self.node_id)
        session_id = self._verify(session._cookie, record)
        session._requested_id = session_id
        if session_id is not None:
            try:
                if self.node_id is None:
                    self._load_id(session, session_id)
                else:
                    self._load_sticky(session, session_id)
            except CorruptPayload as exc:
                self._corrupt(session, exc)
        if session._s.id is None:
            self._start_new(session)
        session._loaded = True
        record.session_id = session._s.id

    def _verify(self, cookie: str | None, record: RequestRecord) -> str | None:
        if cookie is None:
            record.add("no-cookie")
            return None
        verdict = self.signer.unsign(cookie)
        if isinstance(verdict, Verdict):
            record.add(verdict.value)
            return None
        return verdict

    def _fetch(self, session: Session, key: str, ttl: int | None) -> tuple[Record | None, str]:
        """The stored record (expiry slid) and where it came from (sticky: ``local``)."""
        locked = self._renewer is not None and self.lock_policy.should_lock(session._path)
        if self.node_id is not None:  # the lock lives in the node copy; then the node copy is read
            if locked:
                self._lock_and_load(session, key, NO_LOAD)
            return self.store.fetch(key, ttl)  # type: ignore[attr-defined]
        if locked:
            return self._lock_and_load(session, key, ttl), "store"
        return self.store.load_and_touch(key, ttl), "store"

    def _lock_and_load(self, session: Session, key: str, ttl: Any) -> Record | None:
        """Take the session lock (waiting up to ``lock_timeout``) and load in the same round trip."""
        token = secrets.token_urlsafe(16)
        store: LockingStore = self.store  # type: ignore[assignment]
        started = time.monotonic()
        deadline = started + self.settings.lock_timeout
        delay = 0.002
        while True:
            acquired, stored = store.lock(key, token, self.settings.lock_expiry, load_ttl=ttl)
            if acquired:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                session._record.details["lock_wait_ms"] = round((time.monotonic() - started) * 1000, 1)
                raise LockTimeout(f"session lock not acquired within {self.settings.lock_timeout}s")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        waited = time.monotonic() - started
        if waited > 0.001:
            session._record.details["lock_wait_ms"] = round(waited * 1000, 1)
        session._lock = (key, token)
        self._renewer.hold(key, token)  # type: ignore[union-attr]
        return stored

    def _unlock(self, session: Session) -> None:
        key, token = session._lock  # type: ignore[misc]
        session._lock = None
        self._renewer.drop(key, token)  # type: ignore[union-attr]
        try:
            self.store.unlock(key, token)  # type: ignore[attr-defined]
        except (StoreUnavailable, CorruptPayload) as exc:  # expires by itself; or someone replaced it
            _log.warning("sessionstore: could not release a session lock: %s", exc)

    def _load_id(self, session: Session, session_id: str) -> None:
        """Load ``session_id`` (sliding its expiry) into ``session``."""
        key = self.key(session_id)
        expected = self._timeouts.get(key)  # the session's own idle timeout, if seen here before
        stored, source = self._fetch(session, key, self._idle_ttl(expected))
        if stored is None:
            self._missing(session, key)
            return
        if self._adopt(session, session_id, stored):
            meta = session._s.meta
            if meta.max_inactive != expected:  # type: ignore[union-attr]  # slid by the wrong one
                self.store.touch(key, self._ttl(meta))  # type: ignore[arg-type]
            self._timeouts.seen(key, meta.max_inactive)  # type: ignore[union-attr]
            session._record.source = source

    def _adopt(self, session: Session, session_id: str, stored: Record) -> bool:
        """Fill ``session`` from a stored record; False (and a cause) if it expired by ``max_age``.

        :raise CorruptPayload: the record does not decode (see :meth:`_corrupt`).
        """
        record = session._record
        payload = self._decode(stored.data, self.key(session_id))
        self._reader(payload.meta.serializer)
        if self._past_max_age(payload.meta):
            record.add("expired", expired="max_age")
            key = self.key(session_id)
            self.store.delete(key)
            if payload.meta.index and self.index.enabled:
                self._drop_index(self.store, key, record)
            self._final_tombstones.destroyed(key, "expired", self._default_ttl())
            self.listeners.emit(SessionEvent("destroyed", session_id, reason="expired"))
            return False
        s = session._s
        s.id, s.is_new, s.meta, s.payload, s.version = session_id, False, payload.meta, payload, stored.version
        if stored.relocated:  # found on a fallback node: write it back to where it belongs now
            record.add("relocated")
            s.forced = True
        return True

    def _load_sticky(self, session: Session, session_id: str) -> None:
        """Sticky mode: load from the node copy (shared by every worker of the node), or fail over.

        Each request works on its own copy and saves conditionally, merging
        per attribute, as in non-sticky mode. Parallel requests failing over
        one id, on any workers of this node, end as one session.
        """
        if ids.split_route(session_id)[1] == self.node_id:
            self._load_id(session, session_id)
        else:
            self._failover(session, session_id)

    def _failover(self, session: Session, session_id: str) -> None:
        """A session owned by another node arrived here: take it over under our route.

        One worker of this node at a time: the first stores it under a new id
        at once, the parallel requests of the same page that arrive with the
        old id meanwhile, on any worker, get that same new id.
        """
        key = self.key(session_id)
        previous_route = ids.split_route(session_id)[1]
        with self._sticky.taking_over(key) as moved_to:
            if moved_to is not None:
                self._load_id(session, moved_to)
                if session._s.id is not None:
                    session._record.add("route-changed", previous_route=previous_route)
                return
            stored = self.store.load_backup(key, self._default_ttl())  # type: ignore[attr-defined]
            if stored is None:
                self._missing(session, key)
                return
            if not self._adopt(session, session_id, stored):
                return
            s = session._s
            s.stale_ids.append((session_id, "moved", bool(s.meta.index)))  # type: ignore[arg-type, union-attr]
            s.id = ids.new_id(self.node_id)
            s.version = None
            s.forced = True
            self._create(session, Changes())  # stored under the new id now, before any parallel request looks
            s.forced = False
            if self._renewer is not None and self.lock_policy.should_lock(session._path):
                self._lock_and_load(session, self.key(s.id), NO_LOAD)  # before the others can load it
            self._sticky.taken_over(key, s.id)
        session._record.add("route-changed", previous_route=previous_route)
        session._record.source = "failover"

    def _missing(self, session: Session, key: str) -> None:
        cause, note = self.tombstones.diagnose(key)
        if note is None:
            session._record.add(cause)
        else:
            session._record.add(cause, missing=note)

    def _start_new(self, session: Session) -> None:
        now = self.clock()
        s = session._s
        s.id = ids.new_id(self.node_id)
        s.is_new = True
        s.meta = Meta(now, now, self.settings.max_inactive, self.serializer.name)
        s.payload = None
        s.version = None
        session._record.source = "new"

    def _renew(self, session: Session, keep_data: bool) -> None:
        """Give ``session`` a new id (rotate) or make it a new empty session (invalidate)."""
        s = session._s
        if keep_data:
            if s.version is not None:
                s.stale_ids.append((s.id, "rotated", bool(self.index.stored(s))))  # type: ignore[arg-type]
            s.id = ids.new_id(self.node_id)
            s.version = None
            s.forced = True
            session._record.details["rotated"] = True
        else:
            if s.version is not None:
                s.stale_ids.append((s.id, "invalidated", bool(self.index.stored(s))))  # type: ignore[arg-type]
                session._record.add("invalidated")
            s.reset()
            self._start_new(session)
        session._record.session_id = s.id

    def _corrupt(self, session: Session, exc: CorruptPayload) -> None:
        """Stored data this request met does not decode: the contract's ``corrupt-payload``.

        The one place that answers it for a request, wherever it was met: the
        record at load (its framing, payload header, metadata, a tombstone, a
        lock held by something that is not a token), or later (an attribute,
        the attribute index parsed to iterate or save, an index record, the
        record a concurrent writer left). The cause is recorded with what
        failed, nothing stored is changed, and the request goes on with a new
        session that keeps the attributes this request assigned so far (a
        logout it did still holds).
        """
        session._record.add("corrupt-payload", error=str(exc), corrupt_part=exc.part)
        _log.warning("sessionstore: %s of session %s does not decode; left in place, issuing a new session: %s",
                     exc.part, log_id(session._requested_id or session._s.id), exc)
        old = session._s
        session._s = SessionState()
        session._s.stale_ids.extend(item for item in old.stale_ids if item[1] == "invalidated")
        self._start_new(session)
        session._s.assign(old.assigned_values())
        session._record.session_id = session._s.id

    def _drop_index(self, store: Any, key: str, record: RequestRecord | None = None) -> None:
        """Drop the index entries of a session being destroyed or replaced. A damaged reverse
        record cannot say which entries to drop: it is left in place (the entries age out, and
        ``find_by_index`` never returns a session that is gone) and reported."""
        try:
            store.index_drop(key)
        except CorruptPayload as exc:
            if record is not None:
                record.add("corrupt-payload", error=str(exc), corrupt_part=exc.part)
            _log.warning("sessionstore: index entries of a destroyed session left in place: %s", exc)

    # -- serialization --------------------------------------------------------------------------

    def _reader(self, name: str) -> Serializer:
        reader = self._readers.get(name)
        if reader is None:
            if name == "pickle" and self.serializer.name != "pickle":
                raise CorruptPayload("pickled payload, but serializer is not 'pickle': refusing to unpickle")
            try:
                reader = get_serializer(name, self.settings.secret_keys)
            except Exception as exc:  # the name is stored text: not quoted
                raise CorruptPayload(f"bad payload header: written by a serializer this node cannot "
                                     f"read ({type(exc).__name__})") from None
            self._readers[name] = reader
        return reader

    def _decode_attribute(self, state: SessionState, name: str, blob: bytes) -> Any:
        """The value of attribute ``name``; :class:`CorruptPayload` naming it if it does not decode."""
        try:
            return self._reader(state.meta.serializer).loads(blob)  # type: ignore[union-attr]
        except CorruptPayload as exc:
            raise CorruptPayload(f"attribute {name!r}: {exc}", part="attribute", attribute=name) from None

    def _decode_all(self, state: SessionState) -> None:
        """Decode into ``state.values`` every stored attribute not decoded yet (iteration,
        copies): one pass over the attribute table, whatever the number of attributes."""
        payload: Payload = state.payload  # type: ignore[assignment]
        values, removed, data = state.values, state.removed, payload.data
        loads = self._reader(state.meta.serializer).loads  # type: ignore[union-attr]
        for name, start, end in payload.table().spans():
            if name not in values and name not in removed:
                try:
                    values[name] = loads(data[start:end])
                except CorruptPayload as exc:
                    raise CorruptPayload(f"attribute {name!r}: {exc}", part="attribute", attribute=name) from None

    # -- expiry ------------------------------------------------------------------------------------

    def _past_max_age(self, meta: Meta) -> bool:
        max_age = self.settings.max_age
        return max_age is not None and self.clock() - meta.created >= max_age

    def _default_ttl(self) -> int | None:
        return self._idle_ttl(self.settings.max_inactive)

    def _idle_ttl(self, max_inactive: int) -> int | None:
        """Store TTL for an idle timeout of ``max_inactive`` (max_age when it never idles out)."""
        if max_inactive > 0:
            return max_inactive
        return self.settings.max_age  # None: never expires

    def _ttl(self, meta: Meta) -> int | None:
        """Store TTL for a session: its idle timeout, capped by what is left of max_age."""
        remaining = None
        if self.settings.max_age is not None:
            remaining = max(1, math.ceil(meta.created + self.settings.max_age - self.clock()))
        if meta.max_inactive > 0:
            return meta.max_inactive if remaining is None else min(meta.max_inactive, remaining)
        return remaining

    # -- commit ----------------------------------------------------------------------------------------

    def commit(self, session: Session) -> CommitOutcome:
        """Persist what the request did to ``session``; tell the caller what to do with the cookie.

        Raises SerializationError / SessionTooLarge (nothing saved),
        StoreUnavailable, or ConflictError (``on_conflict="error"``).
        """
        if not session._loaded:
            return CommitOutcome()
        s = session._s
        try:
            with s.lock:
                stored = self._commit_state(session)
        finally:
            if session._lock is not None:
                self._unlock(session)
        self.lock_policy.observe(session._path, modified=session._record.saved)
        return self._cookie_outcome(session, stored)

    def _commit_state(self, session: Session) -> bool:
        """Save what the request did; True if the session is stored under ``session._s.id`` now.

        Stored data that does not decode, met on the way (the attribute index,
        an index record, what a concurrent writer left), is answered by
        :meth:`_corrupt`; then what is left of the request is saved as the new session.
        """
        try:
            changes = self._changes(session)
            self._drop_stale(session, "invalidated")  # logout holds even if the save below fails
            stored = self._write_changes(session, changes)
        except CorruptPayload as exc:
            self._corrupt(session, exc)
            stored = self._write_changes(session, self._changes(session))  # nothing stored left to decode
        self._drop_stale(session, "rotated", "moved")  # once the data is safe under the new id
        return stored

    def _changes(self, session: Session) -> Changes:
        changes = session._s.changes(self.serializer.dumps)
        if changes.mutated:
            session._record.add("mutated-in-place", mutated=changes.mutated)
        return changes

    def _write_changes(self, session: Session, changes: Changes) -> bool:
        s = session._s
        if s.version is None:
            return self._create(session, changes)
        if changes or s.forced or s.meta_changed or self.settings.dirty_check == "always":
            return self._update(session, changes)
        return True

    def _cookie_outcome(self, session: Session, stored: bool) -> CommitOutcome:
        if stored and session._s.id != session._requested_id:
            session._requested_id = session._s.id  # the client gets this id now
            return CommitOutcome("set", session._s.id)
        if not stored and session._cookie is not None:
            session._cookie = None  # the client's cookie is deleted now
            return CommitOutcome("delete")
        return CommitOutcome()

    def _drop_stale(self, session: Session, *reasons: str) -> None:
        """Delete the ids this request retired for ``reasons`` and tell listeners.

        ``s.stale_ids`` holds ``(old id, reason, had index entries)``.
        """
        s = session._s
        stale = [item for item in s.stale_ids if item[1] in reasons]
        if not stale:
            return
        s.stale_ids[:] = [item for item in s.stale_ids if item[1] not in reasons]
        moved = []
        for old_id, why, indexed in stale:  # type: ignore[misc]
            key = self.key(old_id)
            # destroyed meanwhile by another call (invalidate_by_index, another logout)?
            # Then that call wrote the tombstone and told the listeners: once per session.
            told_before = self._gone(key) if self._sticky is not None else False
            deleted = self.store.delete(key)
            if indexed and self.index.enabled:
                self._drop_index(self.store, key, session._record)
            if why == "moved":
                moved.append(old_id)
            if why == "invalidated":
                told = told_before if self._sticky is not None else not deleted
                if not told:
                    self._final_tombstones.destroyed(key, "invalidated", self._default_ttl())
                    self.listeners.emit(SessionEvent("destroyed", old_id, reason="invalidated"))
                continue
            self._final_tombstones.destroyed(key, "replaced", self._default_ttl())
            self.listeners.emit(SessionEvent("id_changed", s.id, old_id=old_id))  # type: ignore[arg-type]
        if moved:  # the node we took them over from must drop its copy
            try:
                self._publish(moved, "moved")
            except StoreUnavailable as exc:
                _log.warning("sessionstore: could not tell the previous node that a session moved: %s", exc)

    def _create(self, session: Session, changes: Changes) -> bool:
        """Store a session under an id nothing is stored under yet (new, rotated, moved).

        An empty new session is never stored.
        """
        s = session._s
        if not changes.written and not s.forced and s.payload is None:
            return False
        if self._rotated_from_an_ended_id(s):
            session._record.add("concurrent-update", destroyed_meanwhile=True)
            return False
        key, ttl = self.key(s.id), self._ttl(s.meta)  # type: ignore[arg-type]
        s.meta.tombstoned = 0.0  # type: ignore[union-attr]  # a new id: its tombstone is due now
        tombstone = self._tombstone_due(s.meta, ttl)  # type: ignore[arg-type]
        data, plain = self._serialize(s, changes, s.meta)  # type: ignore[arg-type]
        self._record_index(key, s, ttl, all_pairs=True)  # a new key: every pair, before the session
        result = self.store.save(key, data, ttl, expect=None)
        if not result.ok:  # 256 random bits collided: give up rather than overwrite
            raise StoreUnavailable("session id collision; refusing to overwrite another session")
        self._saved(session, plain, result.version, key, ttl, tombstone)
        if s.is_new:
            self.listeners.emit(SessionEvent("created", s.id))  # type: ignore[arg-type]
        return True

    def _rotated_from_an_ended_id(self, s: SessionState) -> bool:
        """``rotate()`` of a session that was destroyed meanwhile (a logout in a parallel request):
        it must not come back under the new id. Sticky: a look at the node copy; else 1 command."""
        rotated = [old for old, why, _ in s.stale_ids if why == "rotated"]
        if not rotated:
            return False
        key = self.key(rotated[-1])
        ended = self._sticky.is_destroyed(key) if self._sticky is not None else self.store.load(key) is None
        if ended:
            s.stale_ids[:] = [item for item in s.stale_ids if item[1] != "rotated"]
        return ended

    def _update(self, session: Session, changes: Changes) -> bool:
        """Conditional save; on a concurrent write, merge and retry."""
        s = session._s
        key, ttl = self.key(s.id), self._ttl(s.meta)  # type: ignore[arg-type]
        tombstone = self._tombstone_due(s.meta, ttl)  # type: ignore[arg-type]
        data, plain = self._serialize(s, changes, s.meta)  # type: ignore[arg-type]
        self._record_index(key, s, ttl, all_pairs=tombstone is not None)  # new pairs; all on a refresh
        expect = s.version
        for _ in range(_MAX_MERGE_ROUNDS):
            # no backoff: the version in hand is the newest there is, and sleeping would only
            # let it go stale again (every failed round means another request did succeed)
            result = self._write(session, key, data, ttl, expect)
            if result.ok:
                self._saved(session, plain, result.version, key, ttl, tombstone)
                return True
            if result.current is None:
                # Destroyed (invalidated, expired) by someone else: never resurrect it.
                session._record.add("concurrent-update", destroyed_meanwhile=True)
                return False
            (data, plain), expect = self._merge_into(session, changes, result.current), result.current.version
        raise ConflictError(sorted(set(changes.written) | changes.removed))

    def _write(self, session: Session, key: str, data: bytes, ttl: int | None, expect: Any) -> Any:
        """Conditional save; releases the session lock in the same round trip when held on ``key``."""
        lock = session._lock
        if lock is None or lock[0] != key:
            return self.store.save(key, data, ttl, expect=expect)
        session._lock = None
        self._renewer.drop(*lock)  # type: ignore[union-attr]
        return self.store.save_and_unlock(key, data, ttl, expect, lock[1])  # type: ignore[attr-defined]

    def _merge_into(self, session: Session, changes: Changes, current: Record) -> tuple[bytes, bytes]:
        record: RequestRecord = session._record
        s = session._s
        # raises CorruptPayload if the record another writer left does not decode: never overwritten
        theirs: Payload = self._decode(current.data, self.key(s.id))  # type: ignore[arg-type]
        merged, conflicts = merge(
            base={} if s.payload is None else s.payload.blobs(),
            theirs=theirs.blobs(),
            changes=changes,
        )
        if current.relocated and not conflicts and theirs.data == (s.payload and s.payload.data):
            record.add("relocated")  # the copy moved to another node meanwhile; nobody else wrote
        else:
            record.add("concurrent-update")
        if conflicts:
            record.details["conflicts"] = sorted(conflicts)
            # how many saves of each attribute this request's write replaces (lost updates)
            record.details["overwritten"] = conflicts
            if self.settings.on_conflict == "error":
                raise ConflictError(sorted(conflicts))
        meta = _merged_meta(s, theirs.meta)
        blobs = [(name, blob, gen) for name, (blob, gen) in merged.items()]
        return self._finish_payload(meta, blobs, self.key(s.id))  # type: ignore[arg-type]

    def _serialize(self, s: SessionState, changes: Changes, meta: Meta) -> tuple[bytes, bytes]:
        payload = s.payload
        blobs: list[tuple[str, bytes, int]] = []
        if payload is not None:
            data = payload.data
            for name, start, end, (gen, lin) in payload.entries():
                if name in changes.removed:
                    continue
                blob = changes.written.get(name)
                if blob is None:
                    blobs.append((name, data[start:end], (gen, lin)))
                else:
                    blobs.append((name, blob, (gen + 1, lin + 1)))
        for name, blob in changes.written.items():
            if payload is None or name not in payload:
                blobs.append((name, blob, (1, 1)))
        return self._finish_payload(meta, blobs, self.key(s.id))  # type: ignore[arg-type]

    def _finish_payload(self, meta: Meta, blobs: Any, key: str) -> tuple[bytes, bytes]:
        """``(bytes to store, plain payload)``: encoded, size-checked, and sealed to ``key``
        when encryption is on (a sealed record opens only under the key it was written to)."""
        meta.last_accessed = self.clock()
        plain = encode(meta, blobs)
        if len(plain) > self.settings.max_size:
            raise SessionTooLarge(len(plain), self.settings.max_size)
        return (plain if self._sealer is None else self._sealer.seal(plain, key)), plain

    def _decode(self, data: bytes, key: str) -> Payload:
        """The payload of the record stored under ``key`` (opened first when encryption is on)."""
        return decode(data if self._sealer is None else self._sealer.open(data, key))

    def _record_index(self, key: str, s: SessionState, ttl: int | None, *, all_pairs: bool) -> None:
        """Write the index entries this save needs (see :mod:`sessionstore.index`)."""
        names = self.index.pending(s, all_pairs=all_pairs)
        if names:
            self.store.index_add(key, names, entry_ttl(ttl))  # type: ignore[attr-defined]

    def _tombstone_due(self, meta: Meta, ttl: int | None) -> float | None:
        """If this save should refresh the tombstone, stamp ``meta`` and return the time."""
        if not self.tombstones.due(meta, ttl):
            return None
        meta.tombstoned = self.clock()
        return meta.tombstoned

    def _saved(self, session: Session, plain: bytes, version: Any, key: str, ttl: int | None,
               tombstone: float | None) -> None:
        session._s.saved(decode(plain), version)
        session._record.saved = True
        self._timeouts.seen(key, session._s.meta.max_inactive)  # type: ignore[union-attr]
        if tombstone is not None:
            self.tombstones.alive(key, ttl, tombstone)


def merge(
    base: Mapping[str, tuple[bytes, Lineage]],
    theirs: Mapping[str, tuple[bytes, Lineage]],
    changes: Changes,
) -> tuple[dict[str, tuple[bytes, Lineage]], dict[str, int]]:
    """Three-way merge of attributes, each given as ``(blob, (generation, lineage))``.

    ``base`` is what this request loaded, ``theirs`` what the store holds now,
    ``changes`` what this request did. Returns the merged attributes and the
    conflicts: for each attribute both sides changed, the net number of
    updates this request's write replaces (lost to last-writer-wins). It is
    the lineage this write removes minus what it restores: a write from an
    older base can bring back updates another overwrite had removed, so the
    number can be zero or negative, and summed over all writes it is exactly
    the number of lost updates. Both sides writing equal values is still a
    conflict: two increments of a counter from the same base write equal
    values, and one of them is lost.
    """
    merged = dict(theirs)
    conflicts: dict[str, int] = {}
    for name, blob in changes.written.items():
        their_gen, their_lin = theirs.get(name, (b"", NO_LINEAGE))[1]
        base_gen, base_lin = base.get(name, (b"", NO_LINEAGE))[1]
        if their_gen != base_gen or (name in theirs) != (name in base):
            conflicts[name] = their_lin - base_lin
        merged[name] = (blob, (their_gen + 1, base_lin + 1))
    for name in changes.removed:
        if name in theirs:
            (their_gen, their_lin), (base_gen, base_lin) = theirs[name][1], base.get(name, (b"", NO_LINEAGE))[1]
            if their_gen != base_gen:
                conflicts[name] = their_lin - base_lin
        merged.pop(name, None)
    return merged, conflicts


def _merged_meta(state: SessionState, theirs: Meta) -> Meta:
    mine: Meta = state.meta  # type: ignore[assignment]
    meta = Meta(theirs.created, theirs.last_accessed, theirs.max_inactive, theirs.serializer, dict(theirs.index))
    if state.meta_changed:
        meta.max_inactive = mine.max_inactive
        for name, values in mine.index.items():
            merged = meta.index.setdefault(name, [])
            merged.extend(v for v in values if v not in merged)
    return meta

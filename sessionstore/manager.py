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
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import ids
from .debug import RequestRecord, log_id
from .errors import ConflictError, CorruptPayload, SessionTooLarge, StoreUnavailable
from .events import Listeners, SessionEvent
from .payload import Meta, Payload, decode, encode
from .serializers import Serializer, get_serializer
from .session import Changes, Session
from .settings import Settings
from .signing import CookieSigner, Verdict
from .stores import open_store
from .stores.base import ANY, Store

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
        self.store: Store = store if store is not None else open_store(settings.store, clock=self.clock)
        self.serializer: Serializer = get_serializer(settings.serializer, settings.secret_keys)
        self._readers: dict[str, Serializer] = {self.serializer.name: self.serializer}
        self.signer = CookieSigner(settings.secret_keys)
        self.listeners = Listeners()
        self.node_id = settings.node_id if settings.sticky else None
        self._prefix = settings.key_prefix

    # -- public API ------------------------------------------------------------------

    def on(self, event: str, callback: Callable[[SessionEvent], None]) -> None:
        """Call ``callback(SessionEvent)`` on ``created``, ``destroyed`` or ``id_changed``."""
        self.listeners.add(event, callback)

    def load(self, session_id: str) -> Session | None:
        """The stored session ``session_id``, or ``None``. Save changes with :meth:`save`."""
        if not ids.is_valid(session_id):
            return None
        session = Session(self, None, RequestRecord())
        self._load_id(session, session_id)
        session._loaded = True
        return None if session._is_new else session

    def save(self, session: Session) -> None:
        """Commit ``session`` now (it stays usable; later changes are committed again).

        Raises :class:`~sessionstore.errors.ConflictError` with
        ``on_conflict="error"`` when another request changed the same attribute.
        """
        self.commit(session)

    def invalidate(self, session_id: str) -> bool:
        """Destroy the stored session ``session_id`` (from any node). True if it existed."""
        if not ids.is_valid(session_id):
            return False
        deleted = self.store.delete(self.key(session_id))
        if deleted:
            self.listeners.emit(SessionEvent("destroyed", session_id, reason="invalidated"))
        return deleted

    def close(self) -> None:
        """Flush pending work and close store connections."""
        self.store.close()

    def key(self, session_id: str) -> str:
        """Store key of a session: ``<key_prefix>{<id>}`` (a Redis Cluster hash tag)."""
        return f"{self._prefix}{{{session_id}}}"

    # -- request entry points ----------------------------------------------------------------

    def open(self, cookie: str | None, record: RequestRecord) -> Session:
        """A lazy session for a request that carried ``cookie`` (raw value or None)."""
        return Session(self, cookie, record)

    def _load(self, session: Session) -> None:
        """First touch: verify the cookie, load from the store or start a new session."""
        record: RequestRecord = session._state
        session_id = self._verify(session._cookie, record)
        session._requested_id = session_id
        if session_id is not None:
            self._load_id(session, session_id)
        if session._is_new:
            self._start_new(session)
        session._loaded = True
        record.session_id = session._id

    def _verify(self, cookie: str | None, record: RequestRecord) -> str | None:
        if cookie is None:
            record.add("no-cookie")
            return None
        verdict = self.signer.unsign(cookie)
        if isinstance(verdict, Verdict):
            record.add(verdict.value)
            return None
        return verdict

    def _load_id(self, session: Session, session_id: str) -> None:
        record: RequestRecord = session._state
        key = self.key(session_id)
        stored = self.store.load_and_touch(key, self._default_ttl())
        if stored is None:
            record.add("unknown-id")
            return
        try:
            payload = decode(stored.data)
            self._reader(payload.meta.serializer)
        except CorruptPayload as exc:
            record.add("corrupt-payload", error=str(exc))
            _log.warning("sessionstore: corrupt payload for session %s left in place: %s", log_id(session_id), exc)
            return
        meta = payload.meta
        if self._past_max_age(meta):
            record.add("expired", expired="max_age")
            self.store.delete(key)
            self.listeners.emit(SessionEvent("destroyed", session_id, reason="expired"))
            return
        if stored.relocated:
            record.add("relocated")
        if meta.max_inactive != self.settings.max_inactive:
            self.store.touch(key, self._ttl(meta))
        session._id = session_id
        session._is_new = False
        session._meta = meta
        session._payload = payload
        session._version = stored.version
        record.source = "store"

    def _start_new(self, session: Session) -> None:
        now = self.clock()
        session._id = ids.new_id(self.node_id)
        session._is_new = True
        session._meta = Meta(now, now, self.settings.max_inactive, self.serializer.name)
        session._payload = None
        session._version = None
        session._state.source = "new"

    def _renew(self, session: Session, keep_data: bool) -> None:
        """Give ``session`` a new id (rotate) or make it a new empty session (invalidate)."""
        if keep_data:
            if not session._is_new:
                session._stale_ids.append((session._id, "rotated"))
            session._id = ids.new_id(self.node_id)
            session._version = None
            session._forced = True
        else:
            if not session._is_new:
                session._stale_ids.append((session._id, "invalidated"))
                session._state.add("invalidated")
            session._reset()
            self._start_new(session)
        session._state.session_id = session._id

    def _corrupt(self, session: Session) -> None:
        """An attribute blob failed to decode: continue with a new session, data left in place."""
        session._state.add("corrupt-payload")
        _log.warning("sessionstore: corrupt attribute in session %s; issuing a new session", log_id(session._id))
        session._reset()
        self._start_new(session)

    # -- serialization --------------------------------------------------------------------------

    def _reader(self, name: str) -> Serializer:
        reader = self._readers.get(name)
        if reader is None:
            if name == "pickle" and self.serializer.name != "pickle":
                raise CorruptPayload("pickled payload, but serializer is not 'pickle': refusing to unpickle")
            try:
                reader = get_serializer(name, self.settings.secret_keys)
            except Exception as exc:
                raise CorruptPayload(f"payload written by serializer {name!r}: {exc}") from None
            self._readers[name] = reader
        return reader

    def _decode_attribute(self, session: Session, blob: bytes) -> Any:
        return self._reader(session._meta.serializer).loads(blob)  # type: ignore[union-attr]

    def _encode_attribute(self, session: Session, value: Any, name: str) -> bytes:
        return self.serializer.dumps(value, name)

    # -- expiry ------------------------------------------------------------------------------------

    def _past_max_age(self, meta: Meta) -> bool:
        max_age = self.settings.max_age
        return max_age is not None and self.clock() - meta.created >= max_age

    def _default_ttl(self) -> int | None:
        max_inactive = self.settings.max_inactive
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
        record: RequestRecord = session._state
        changes = session._changes()
        if changes.mutated:
            record.add("mutated-in-place", mutated=changes.mutated)
        self._drop_stale(session, "invalidated")  # logout holds even if the save below fails
        if session._is_new:
            stored = self._create(session, changes)
        elif changes or session._forced or session._meta_changed or self.settings.dirty_check == "always":
            stored = self._update(session, changes)
        else:
            stored = True
        self._drop_stale(session, "rotated")  # only once the data is safe under the new id
        return self._cookie_outcome(session, stored)

    def _cookie_outcome(self, session: Session, stored: bool) -> CommitOutcome:
        if stored and session._id != session._requested_id:
            session._requested_id = session._id  # the client gets this id now
            return CommitOutcome("set", session._id)
        if not stored and session._cookie is not None:
            session._cookie = None  # the client's cookie is deleted now
            return CommitOutcome("delete")
        return CommitOutcome()

    def _drop_stale(self, session: Session, why: str) -> None:
        """Delete the ids this request retired for ``why`` and tell listeners."""
        stale = [old for old, reason in session._stale_ids if reason == why]
        session._stale_ids[:] = [item for item in session._stale_ids if item[1] != why]
        for old_id in stale:
            self.store.delete(self.key(old_id))
            if why == "invalidated":
                self.listeners.emit(SessionEvent("destroyed", old_id, reason="invalidated"))
            else:
                self.listeners.emit(SessionEvent("id_changed", session._id, old_id=old_id))

    def _create(self, session: Session, changes: Changes) -> bool:
        """Store a new session, unless it is empty (an empty new session is never stored)."""
        if not changes.written and not session._forced:
            return False
        data = self._serialize(session, changes, session._meta)  # type: ignore[arg-type]
        result = self.store.save(self.key(session._id), data, self._ttl(session._meta), expect=None)  # type: ignore[arg-type]
        if not result.ok:  # 256 random bits collided: give up rather than overwrite
            raise StoreUnavailable("session id collision; refusing to overwrite another session")
        self._saved(session, data, result.version)
        self.listeners.emit(SessionEvent("created", session._id))  # type: ignore[arg-type]
        return True

    def _update(self, session: Session, changes: Changes) -> bool:
        """Conditional save; on a concurrent write, merge and retry."""
        record: RequestRecord = session._state
        meta: Meta = session._meta  # type: ignore[assignment]
        key = self.key(session._id)  # type: ignore[arg-type]
        data = self._serialize(session, changes, meta)
        version = session._version
        expect = None if version is None else version
        for attempt in range(_MAX_MERGE_ROUNDS):
            if attempt > 2:  # heavy contention: let the others through (jittered backoff)
                time.sleep(random.uniform(0, 0.0005 * attempt))
            result = self.store.save(key, data, self._ttl(meta), expect=expect)
            if result.ok:
                self._saved(session, data, result.version)
                return True
            if result.current is None:
                # Destroyed (invalidated, expired) by someone else: never resurrect it.
                record.add("concurrent-update", destroyed_meanwhile=True)
                return False
            data, expect = self._merge_into(session, changes, result.current.data), result.current.version
        raise StoreUnavailable("session kept changing under concurrent writers; gave up merging")

    def _merge_into(self, session: Session, changes: Changes, theirs_data: bytes) -> bytes:
        record: RequestRecord = session._state
        try:
            theirs = decode(theirs_data)
        except CorruptPayload:
            theirs = None
        base = session._payload
        merged, conflicts = merge(
            base={} if base is None else base.blobs(),
            theirs={} if theirs is None else theirs.blobs(),
            changes=changes,
        )
        record.add("concurrent-update")
        if conflicts:
            record.details.setdefault("conflicts", [])
            record.details["conflicts"] = sorted(set(record.details["conflicts"]) | set(conflicts))
            if self.settings.on_conflict == "error":
                raise ConflictError(sorted(conflicts))
        meta = session._meta if theirs is None else _merged_meta(session, theirs.meta)
        return self._finish_payload(meta, merged.items())  # type: ignore[arg-type]

    def _serialize(self, session: Session, changes: Changes, meta: Meta) -> bytes:
        payload = session._payload
        blobs: list[tuple[str, bytes]] = []
        if payload is not None:
            data = payload.data
            for name, start, end in payload.entries():
                if name in changes.removed:
                    continue
                blob = changes.written.get(name)
                blobs.append((name, data[start:end] if blob is None else blob))
        for name, blob in changes.written.items():
            if payload is None or name not in payload:
                blobs.append((name, blob))
        return self._finish_payload(meta, blobs)

    def _finish_payload(self, meta: Meta, blobs: Any) -> bytes:
        meta.last_accessed = self.clock()
        data = encode(meta, blobs)
        if len(data) > self.settings.max_size:
            raise SessionTooLarge(len(data), self.settings.max_size)
        return data

    def _saved(self, session: Session, data: bytes, version: Any) -> None:
        """After a successful write the session reflects the stored state."""
        session._payload = decode(data)
        session._meta = session._payload.meta
        session._version = version
        session._is_new = False
        session._assigned.clear()
        session._removed.clear()
        session._forced = False
        session._meta_changed = False
        session._state.saved = True


def merge(
    base: Mapping[str, bytes], theirs: Mapping[str, bytes], changes: Changes
) -> tuple[dict[str, bytes], list[str]]:
    """Three-way merge of attribute blobs.

    ``base`` is what this request loaded, ``theirs`` what the store holds now,
    ``changes`` what this request did. Returns the merged attributes and the
    names both sides changed differently (conflicts, resolved here in favour
    of this request: last writer wins).
    """
    merged = dict(theirs)
    conflicts: list[str] = []
    for name, blob in changes.written.items():
        other = theirs.get(name)
        if other != base.get(name) and other != blob:
            conflicts.append(name)
        merged[name] = blob
    for name in changes.removed:
        other = theirs.get(name)
        if other is not None and other != base.get(name):
            conflicts.append(name)
        merged.pop(name, None)
    return merged, conflicts


def _merged_meta(session: Session, theirs: Meta) -> Meta:
    mine: Meta = session._meta  # type: ignore[assignment]
    meta = Meta(theirs.created, theirs.last_accessed, theirs.max_inactive, theirs.serializer, dict(theirs.index))
    if session._meta_changed:
        meta.max_inactive = mine.max_inactive
        for name, values in mine.index.items():
            merged = meta.index.setdefault(name, [])
            merged.extend(v for v in values if v not in merged)
    return meta

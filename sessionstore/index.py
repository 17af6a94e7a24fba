"""Finding sessions by an external id: the manager's side of ``session.index()``.

``session.index(name, value)`` records an external id (a CAS service
ticket, a user name) in the session's metadata. The manager turns each
``(name, value)`` into an *index key*::

    <key_prefix>ix:{<sha256 hex of the JSON array [name, value]>}

so any string works as a value (spaces, unicode, 10 kB tickets): the key is
printable ASCII of fixed length (a valid memcached key), and its hash tag is
the digest (Redis Cluster spreads index keys over the slots). The store
keeps the entries (:class:`~sessionstore.stores.base.IndexStore`);
``manager.find_by_index`` returns the ids of the live sessions recorded
under a key, ``manager.invalidate_by_index`` destroys them.

When entries are written
    On the save that records a new ``(name, value)``: only the new pairs,
    just before the session itself is written (so a stored session is never
    without its entries; if the save then fails, the entries point to a key
    that does not exist and are never returned). On every save that creates
    a key (a new session, ``rotate()``, a sticky failover) all the session's
    pairs are recorded under the new key, and the old key's entries are
    dropped once the session is safe under the new one, so a search finds the
    new id and never the old. ``invalidate()`` (and ``manager.invalidate``,
    ``invalidate_by_index``, a ``max_age`` expiry seen on load) drops them
    with the session.

Lifetime rule
    An entry written at time *r* for a session whose store TTL is then *T*
    lives until at least *r + T + G*, where the grace *G* is
    :data:`INDEX_GRACE` (one day) or *T/4* if that is longer; for a session
    without TTL, until it is dropped. Entries are written again (*r* moves
    up) whenever a save refreshes the session's tombstone: the first save of
    every id, then any save at least *T/4* after the last refresh; and on a
    save that changes the session's idle timeout (``session.max_inactive``).
    A read-only request slides the session's expiry without rewriting
    anything (that is its cost target), so it does not refresh the entries.
    Hence: **the entries outlive the session whenever its last request comes
    before r + G**. Every save keeps that true (a save before *r + T/4*
    expires the session by *r + T/4 + T ≤ r + T + G*, a later one moves *r*),
    so a session that is saved at least once every *G − T/4* (18 hours with
    the default 30-minute timeout) never loses its entries; only a session
    used read-only for longer than that since its last refresh can outlive
    them (``find_by_index`` then misses it). Entries of a session that
    expired without being invalidated are never returned (the store filters
    by the session's existence) and age out by themselves one grace period
    after their session.

Costs (store commands, on the save that records new pairs or refreshes
them; nothing on any other request, see also ``tests/integration/test_single_sign_out.py``):

==============  ===============================================================
Redis           1 (one script: the reverse set and every forward key)
Redis Cluster   one script per slot touched: 1 + one per pair (a login
                recording a ticket and a user name: 3)
memcached       2 per new record (``add`` and its backup copy): a login
                recording one pair 4, two pairs 6; a refresh 4 per record
SQL             1 (one multi-row upsert)
memory          1
==============  ===============================================================

In sticky mode the entries go through the backup writer like the backup
itself (``backup="async"``: off the request). ``find_by_index`` costs 1-2
commands plus about one per session found (the existence check);
``invalidate_by_index`` adds, per session, its delete, tombstone and index
drop, and in sticky mode one feed message for all of them.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable

from . import ids
from .errors import CorruptPayload
from .payload import Meta, decode
from .session import SessionState
from .stores.base import IndexStore
from .tombstones import TOMBSTONE_GRACE

__all__ = ["INDEX_GRACE", "index_key", "entry_ttl", "SessionIndex"]

#: How long index entries outlive the session TTL they were written with.
INDEX_GRACE = TOMBSTONE_GRACE


def index_key(prefix: str, name: str, value: str) -> str:
    """Store key of the pair ``(name, value)``: ``<prefix>ix:{<sha256 hex>}``."""
    digest = hashlib.sha256(json.dumps([name, value], ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"{prefix}ix:{{{digest}}}"


def entry_ttl(ttl: int | None) -> int | None:
    """Lifetime of index entries written for a session stored with ``ttl``: ``ttl`` plus the
    grace, one day or a quarter of ``ttl`` if longer (a save refreshes them only after that)."""
    return None if ttl is None else ttl + max(INDEX_GRACE, math.ceil(ttl / 4))


def _pairs(index: dict[str, list[str]]) -> Iterable[tuple[str, str]]:
    for name, values in index.items():
        for value in values:
            yield name, value


class SessionIndex:
    """The index operations of one manager (``store`` may lack the protocol: then no index)."""

    def __init__(self, store: Any, prefix: str) -> None:
        self.store = store if isinstance(store, IndexStore) else None
        self.prefix = prefix

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def key(self, name: str, value: str) -> str:
        return index_key(self.prefix, name, value)

    def session_id(self, session_key: str) -> str | None:
        """The session id in a session key ``<prefix>{<id>}`` (None if it is not one)."""
        head = self.prefix + "{"
        if session_key.startswith(head) and session_key.endswith("}"):
            return session_key[len(head):-1]
        return None

    def entry(self, session_key: object) -> str:
        """The session id of an index entry (a session key the store found under an index key).

        :raise CorruptPayload: (``index entry``) it is not the key of a well-formed id.
        """
        session_id = self.session_id(session_key) if type(session_key) is str else None
        if session_id is None or not ids.is_valid(session_id):
            raise CorruptPayload("bad index entry: not the key of a session", part="index entry")  # never quoted
        return session_id

    @staticmethod
    def _stored_meta(state: SessionState) -> Meta | None:
        """The metadata as the store holds it for ``state`` (of the payload last loaded or saved;
        ``state.meta`` is that payload's meta object, changed in place since)."""
        if state.payload is None:
            return None
        try:
            return decode(state.payload.data).meta
        except CorruptPayload:
            return None

    @classmethod
    def stored(cls, state: SessionState) -> dict[str, list[str]]:
        """The pairs the store holds for ``state``."""
        meta = cls._stored_meta(state)
        return {} if meta is None else meta.index

    def pending(self, state: SessionState, *, all_pairs: bool) -> list[str]:
        """Index keys a save of ``state`` must record: all of them (``all_pairs``, or the session's
        idle timeout changed: the entries' lifetime follows it), or only the pairs new since the
        last save."""
        current = state.meta.index if state.meta is not None else {}
        if not current or self.store is None:
            return []
        stored = None if all_pairs else self._stored_meta(state)
        if stored is None or stored.max_inactive != state.meta.max_inactive:  # type: ignore[union-attr]
            return [self.key(n, v) for n, v in _pairs(current)]
        return [self.key(n, v) for n, v in _pairs(current) if v not in stored.index.get(n, ())]

"""Tombstones: telling why a session is missing.

A session that is not in the store was never known, expired, was evicted
(lost while it should have been alive: memcached LRU, Redis ``maxmemory`` or
a restart without persistence), or was invalidated. The store alone cannot
tell these apart, so next to each session key lives a small tombstone,
``<key>:t``, outliving the session by :data:`TOMBSTONE_GRACE` seconds:

``{"s": "alive", "w": <written at>, "u": <guaranteed alive until>}``
    written with a save, when the last one is older than a quarter of the
    idle timeout (so it costs a store command only now and then, never on a
    read-only request);
``{"s": "invalidated" | "expired", "w": <when>}``
    written when the session is destroyed;
``{"s": "replaced", "w": <when>}``
    written when its id was replaced (``rotate()``, a sticky failover).

On a miss the tombstone is read (one command, only on that path):
``invalidated`` and ``expired`` say so; ``replaced`` is an
``unknown-id`` whose note says the id was replaced; ``alive`` with a guarantee that has
not run out yet means the store lost the session (``evicted``); ``alive``
past its guarantee means it expired (read-only requests slide the expiry
without refreshing the tombstone, so this is the likely reading); no
tombstone at all: ``unknown-id``. A tombstone that does not decode (see
:func:`read_stone`) raises :class:`~sessionstore.errors.CorruptPayload`, which the
manager answers like any undecodable stored data (``corrupt-payload``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Callable

from .decoding import epoch, field, json_document
from .errors import CorruptPayload, StoreError
from .payload import Meta
from .stores.base import Store, companion_key

_log = logging.getLogger("sessionstore")

__all__ = ["Tombstones", "TOMBSTONE_GRACE", "STATES", "read_stone"]

#: How long a tombstone outlives the session it describes.
TOMBSTONE_GRACE = 86_400
#: Lifetime of a tombstone for a session that never expires.
_FOREVER_TOMBSTONE = 30 * 86_400


#: The states a tombstone can be in.
STATES = ("alive", "invalidated", "expired", "replaced")
_PART = "tombstone"


@dataclass(frozen=True, slots=True)
class _Stone:
    state: str
    written: float
    until: float | None = None


def read_stone(data: bytes) -> _Stone:
    """The tombstone in ``data``: ``{"s": <state>, "w": <written at>[, "u": <alive until>]}``.

    :raise CorruptPayload: (``tombstone``) anything else.
    """
    raw = json_document(data, _PART)
    if type(raw) is not dict or raw.get("s") not in STATES:
        raise CorruptPayload(f"bad {_PART}: not an object with a known state", part=_PART)
    until = None if raw.get("u") is None else epoch(raw["u"], "u", _PART)
    return _Stone(raw["s"], field(raw, "w", _PART, epoch), until)


class Tombstones:
    """Writes and reads the tombstones of one store."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock

    def due(self, meta: Meta, ttl: int | None) -> bool:
        """Whether a save should refresh the ``alive`` tombstone."""
        if meta.tombstoned <= 0:
            return True
        refresh = (ttl or _FOREVER_TOMBSTONE) / 4
        return self.clock() - meta.tombstoned >= refresh

    def alive(self, key: str, ttl: int | None, now: float) -> None:
        """The session was saved at ``now`` with ``ttl``: it is alive at least that long."""
        until = None if ttl is None else now + ttl
        self._put(key, _Stone("alive", now, until), ttl)

    def destroyed(self, key: str, reason: str, ttl: int | None) -> None:
        """The session ``key`` was invalidated or expired."""
        self._put(key, _Stone(reason, self.clock()), ttl)

    def diagnose(self, key: str) -> tuple[str, str | None]:
        """The cause code for a session missing from the store, and a note (or None).

        :raise CorruptPayload: the tombstone does not decode (it is left as it is).
        """
        stored = self.store.load(companion_key(key, "t"))
        if stored is None:
            return "unknown-id", None
        stone = read_stone(stored.data)
        if stone.state in ("invalidated", "expired"):
            return stone.state, None
        if stone.state == "replaced":
            return "unknown-id", "this id was replaced (rotate() or a failover to another node)"
        if stone.until is None or self.clock() < stone.until:
            return "evicted", "the store lost a session that should still be alive"
        return "expired", None

    def _put(self, key: str, stone: _Stone, ttl: int | None) -> None:
        """Write a tombstone; a failure only costs the diagnosis, never the request."""
        body: dict[str, object] = {"s": stone.state, "w": round(stone.written, 3)}
        if stone.until is not None:
            body["u"] = round(stone.until, 3)
        lifetime = _FOREVER_TOMBSTONE if ttl is None else ttl + TOMBSTONE_GRACE
        try:
            self.store.save(companion_key(key, "t"), json.dumps(body).encode(), math.ceil(lifetime))
        except StoreError as exc:
            _log.debug("sessionstore: tombstone not written: %s", exc)

"""The session object the application sees: a lazy, access-tracking mapping.

Nothing is loaded until the application first touches the session. Each
attribute is deserialized on first access and remembered; at the end of the
request only those attributes are serialized again and compared, byte for
byte, with what was loaded. An attribute never handed to the application
cannot have changed, so it is neither decoded nor re-encoded, and a change
made in place (``session["cart"]["items"].append(1)``) is seen like an
assignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, MutableMapping

from .errors import CorruptPayload
from .payload import Meta, Payload

if TYPE_CHECKING:  # pragma: no cover
    from .manager import SessionManager

__all__ = ["Session", "Changes"]


@dataclass(slots=True)
class Changes:
    """What a request did to its session, attribute by attribute."""

    #: name -> new serialized blob, for attributes whose content changed.
    written: dict[str, bytes] = field(default_factory=dict)
    #: names removed (that existed when loaded).
    removed: set[str] = field(default_factory=set)
    #: changed attributes that were never assigned: mutated in place.
    mutated: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.written or self.removed)


class Session(MutableMapping[str, Any]):
    """A server-side session: a ``MutableMapping[str, Any]`` with Tomcat's extras.

    ``id``, ``is_new``, ``created``, ``last_accessed`` and ``max_inactive``
    load the session if it is not loaded yet, like any data access.
    """

    __slots__ = (
        "_manager", "_cookie", "_loaded", "_id", "_is_new", "_meta", "_payload",
        "_version", "_values", "_assigned", "_removed", "_forced", "_meta_changed",
        "_stale_ids", "_requested_id", "_state", "__weakref__",
    )

    def __init__(self, manager: "SessionManager", cookie: str | None, state: Any = None) -> None:
        self._manager = manager
        self._cookie = cookie  # raw cookie value, verified on first touch
        self._state = state  # request bookkeeping owned by the manager
        self._loaded = False
        self._requested_id: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._id: str | None = None
        self._is_new = True
        self._meta: Meta | None = None
        self._payload: Payload | None = None
        self._version: Any = None
        self._values: dict[str, Any] = {}
        self._assigned: set[str] = set()
        self._removed: set[str] = set()
        self._forced = False
        self._meta_changed = False
        self._stale_ids: list[str] = getattr(self, "_stale_ids", [])

    # -- loading --------------------------------------------------------------

    def _ensure(self) -> None:
        if not self._loaded:
            self._manager._load(self)  # sets _loaded, _id, _meta, _payload, ...

    @property
    def loaded(self) -> bool:
        """Whether the application has touched (and so loaded) the session."""
        return self._loaded

    # -- Tomcat-style attributes ---------------------------------------------------

    @property
    def id(self) -> str:
        """The session id (``<random>.<node>`` in sticky mode)."""
        self._ensure()
        return self._id  # type: ignore[return-value]

    @property
    def is_new(self) -> bool:
        """True until the session has been stored once and sent back by the client."""
        self._ensure()
        return self._is_new

    @property
    def created(self) -> float:
        """Creation time, epoch seconds."""
        self._ensure()
        return self._meta.created  # type: ignore[union-attr]

    @property
    def last_accessed(self) -> float:
        """Time of the previous request that loaded this session (epoch seconds).

        In non-sticky mode this is the time of the last *write*: read-only
        requests only slide the store expiry and do not rewrite the session.
        """
        self._ensure()
        return self._meta.last_accessed  # type: ignore[union-attr]

    @property
    def max_inactive(self) -> int:
        """Idle timeout of this session in seconds; ``<= 0`` never expires."""
        self._ensure()
        return self._meta.max_inactive  # type: ignore[union-attr]

    @max_inactive.setter
    def max_inactive(self, seconds: int) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise TypeError("max_inactive must be an int (seconds)")
        self._ensure()
        if seconds != self._meta.max_inactive:  # type: ignore[union-attr]
            self._meta.max_inactive = seconds  # type: ignore[union-attr]
            self._meta_changed = True

    def invalidate(self) -> None:
        """Destroy this session now (logout).

        The stored session is deleted at the end of the request and the
        ``destroyed`` listeners fire. The object becomes a new, empty session:
        data written to it afterwards starts a fresh session with a new id.
        """
        self._ensure()
        self._manager._renew(self, keep_data=False)

    def rotate(self) -> None:
        """Give this session a new id, keeping its data (call it at login).

        The old id is deleted from the store at the end of the request and
        loads nothing afterwards; ``id_changed`` listeners fire.
        """
        self._ensure()
        self._manager._renew(self, keep_data=True)

    def mark_modified(self) -> None:
        """Save this session at the end of the request even if nothing changed."""
        self._ensure()
        self._forced = True

    def index(self, name: str, value: str) -> None:
        """Record an external id for this session (e.g. a CAS service ticket).

        ``manager.find_by_index(name, value)`` and ``manager.invalidate_by_index``
        then find this session from any node.
        """
        if not isinstance(name, str) or not isinstance(value, str) or not name or not value:
            raise TypeError("index name and value must be non-empty strings")
        self._ensure()
        values = self._meta.index.setdefault(name, [])  # type: ignore[union-attr]
        if value not in values:
            values.append(value)
            self._meta_changed = True

    # -- mapping --------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        self._ensure()
        try:
            return self._values[name]
        except KeyError:
            pass
        payload = self._payload
        if payload is None or name in self._removed:
            raise KeyError(name)
        try:
            span = payload.span(name)
            if span is None:
                raise KeyError(name)
            value = self._manager._decode_attribute(self, payload.data[span[0]:span[1]])
        except CorruptPayload:
            self._manager._corrupt(self)
            raise KeyError(name) from None
        self._values[name] = value
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"session attribute names are str, got {type(name).__name__}")
        self._ensure()
        self._values[name] = value
        self._assigned.add(name)
        self._removed.discard(name)

    def __delitem__(self, name: str) -> None:
        self._ensure()
        if name not in self:
            raise KeyError(name)
        self._values.pop(name, None)
        if self._payload is not None and name in self._payload:
            self._removed.add(name)

    def __contains__(self, name: object) -> bool:
        self._ensure()
        if name in self._values:
            return True
        payload = self._payload
        return payload is not None and name not in self._removed and name in payload

    def _names(self) -> list[str]:
        names = list(self._values)
        if self._payload is not None:
            names.extend(n for n in self._payload.names() if n not in self._values and n not in self._removed)
        return names

    def __iter__(self) -> Iterator[str]:
        self._ensure()
        return iter(self._names())

    def __len__(self) -> int:
        self._ensure()
        return len(self._names())

    def copy(self) -> dict[str, Any]:
        """A plain dict of every attribute (marks them all touched)."""
        return dict(self.items())

    def clear(self) -> None:
        self._ensure()
        for name in self._names():
            del self[name]

    def __repr__(self) -> str:
        if not self._loaded:
            return "<Session (not loaded)>"
        return f"<Session {self._manager._log_id(self._id)} new={self._is_new} keys={self._names()!r}>"

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return self is other

    # -- end of request ------------------------------------------------------------

    def _changes(self) -> Changes:
        """Serialize the touched attributes and diff them against what was loaded.

        Raises :class:`~sessionstore.errors.SerializationError` naming the path
        of a value that cannot be serialized.
        """
        changes = Changes(removed=set(self._removed))
        payload = self._payload
        dumps = self._manager._encode_attribute
        for name, value in self._values.items():
            blob = dumps(self, value, name)
            if payload is not None and name not in self._removed and name in payload:
                if payload.blob(name) == blob:
                    continue
                if name not in self._assigned:
                    changes.mutated.append(name)
            changes.written[name] = blob
        return changes
